"""The README's architecture table is what the code and the recorded runs say (tests/arch_table.py)."""

from __future__ import annotations

import arch_table


def test_readme_table_is_current() -> None:
    text = arch_table.README.read_text()
    found = arch_table.readme_table(text)
    assert found is not None, "README.md lost its architecture table markers"
    assert found == arch_table.table(), (
        "README.md's architecture table is stale: run `python tests/arch_table.py --write`"
    )


def test_table_rows_follow_the_code() -> None:
    rows = {r[0]: r for r in arch_table.rows()}
    # an engine architecture is read by spec_from_gguf and has recorded runs to check against
    for arch, (_, _, spec, recorded, engine) in rows.items():
        if engine == "yes":
            assert spec == "yes", arch
            assert recorded != "-", f"{arch}: the engine decodes it, but no run checks it"
    assert rows["llama"][4] == "yes" and rows["mamba"][1] == "recurrent"
