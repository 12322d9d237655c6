"""`flashhead doctor --url`: what a running server's FlashHead counters say, per model.

It reads the server's ``/metrics`` (Prometheus text, parsed by ``prometheus_client``) and keeps
the series declared in ``flashhead.metrics``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from flashhead import metrics


class ServerReportError(RuntimeError):
    """The server could not be read, or shows no FlashHead metrics; the message says why."""


@dataclass
class ModelReport:
    model_name: str
    rows: dict[str, int] = field(default_factory=dict)  # "flashhead" or "dense:<reason>"
    shadow_rows: int = 0
    shadow_top1_agree: int = 0
    shadow_top5_contained: int = 0
    fallback_active: bool = False
    heads: dict[str, int] = field(default_factory=dict)  # layout -> FlashHead heads built

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def agreement(self) -> float | None:
        return self.shadow_top1_agree / self.shadow_rows if self.shadow_rows else None


def fetch_metrics_text(url: str, timeout: float = 10.0) -> str:
    base = url.rstrip("/")
    target = base if base.endswith("/metrics") else base + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerReportError(
            f"cannot read {target}: {reason}. Is `vllm serve` running there? "
            "Pass its address, e.g. --url http://127.0.0.1:8000"
        ) from exc


def parse_reports(text: str) -> dict[str, ModelReport]:
    from prometheus_client.parser import text_string_to_metric_families

    reports: dict[str, ModelReport] = {}

    def report(labels: dict) -> ModelReport:
        name = labels.get("model_name", "")
        return reports.setdefault(name, ModelReport(name))

    shadow_fields = {
        metrics.SHADOW_ROWS: "shadow_rows",
        metrics.SHADOW_TOP1_AGREE: "shadow_top1_agree",
        metrics.SHADOW_TOP5_CONTAINED: "shadow_top5_contained",
    }
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("flashhead_"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            r = report(sample.labels)
            value = int(sample.value)
            if family.name == metrics.DECODE_ROWS:
                path = sample.labels.get("path", "")
                key = path if path != "dense" else f"dense:{sample.labels.get('reason', '')}"
                r.rows[key] = r.rows.get(key, 0) + value
            elif family.name in shadow_fields:
                setattr(r, shadow_fields[family.name], value)
            elif family.name == metrics.FALLBACK_ACTIVE:
                r.fallback_active = bool(value)
            elif family.name == metrics.HEADS:
                r.heads[sample.labels.get("layout", "")] = value
    return reports


def server_reports(url: str) -> dict[str, ModelReport]:
    reports = parse_reports(fetch_metrics_text(url))
    if not reports:
        raise ServerReportError(
            f"{url} serves /metrics but no FlashHead metrics: no FlashHead model has served a "
            "decode step there yet, or FlashHead is off (FLASHHEAD_ENABLED=0, or the doctor "
            "without --url says why)"
        )
    return reports


def describe_layout(heads: dict[str, int]) -> str:
    """What the heads by layout say of how the server spreads the model."""
    tp = heads.get(metrics.LAYOUT_TENSOR_PARALLEL, 0)
    single = heads.get(metrics.LAYOUT_SINGLE, 0)
    parts = []
    if tp:
        parts.append(f"{tp} tensor-parallel ranks, each scoring its own clusters")
    if single == 1:
        parts.append("one FlashHead head (one worker)")
    elif single:
        parts.append(f"{single} FlashHead heads, one per worker (data-parallel engines)")
    return "; ".join(parts) or "no FlashHead head built yet"


def format_reports(url: str, reports: dict[str, ModelReport]) -> str:
    lines = [f"flashhead doctor --url {url}"]
    for r in reports.values():
        total = r.total_rows
        lines.append(f"model {r.model_name}")
        lines.append(f"  layout: {describe_layout(r.heads)}")
        lines.append(f"  decode rows: {total}")
        for key, n in sorted(r.rows.items(), key=lambda kv: -kv[1]):
            share = 100.0 * n / total if total else 0.0
            lines.append(f"    {key:<28} {n:>10}  ({share:.1f} %)")
        if r.shadow_rows:
            lines.append(
                f"  shadow check: top-1 agreement {100.0 * r.agreement:.2f} % over {r.shadow_rows}"
                f" rows, dense top-1 in FlashHead's top-5 "
                f"{100.0 * r.shadow_top5_contained / r.shadow_rows:.2f} %"
            )
        else:
            lines.append("  shadow check: off (FLASHHEAD_SHADOW=0) or no greedy rows yet")
        lines.append(
            "  guard: FALLEN BACK, the model is served dense (see the server log)"
            if r.fallback_active
            else "  guard: FlashHead serving"
        )
    return "\n".join(lines)


def run_server_report(url: str, as_json: bool = False) -> int:
    try:
        reports = server_reports(url)
    except ServerReportError as exc:
        if as_json:
            print(json.dumps({"url": url, "error": str(exc)}))
        else:
            print(f"flashhead doctor: {exc}")
        return 1
    if as_json:
        out = {
            "url": url,
            "models": [
                dict(asdict(r), total_rows=r.total_rows, agreement=r.agreement)
                for r in reports.values()
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_reports(url, reports))
    return 0
