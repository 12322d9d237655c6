"""The one text-table helper behind the doctor, `patchsets check` and `patchsets table`."""

from __future__ import annotations

from flashhead.text_table import pad_columns, text_table


def test_columns_align_to_the_widest_cell_and_the_header_is_ruled():
    lines = text_table([["id", "status"], ["architectures", "applied"], ["x", "skipped-version"]])
    assert lines == [
        "id             status",
        "-------------  ---------------",
        "architectures  applied",
        "x              skipped-version",
    ]


def test_without_header_no_rule_and_ragged_rows_pad_what_they_have():
    assert text_table([["a", "bb"], ["ccc"]], header=False) == ["a    bb", "ccc"]
    assert pad_columns([["a", "bb"], ["ccc"]]) == [["a  ", "bb"], ["ccc"]]
    assert text_table([]) == []
