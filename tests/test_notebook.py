"""The Colab notebook `colab/quickstart.ipynb` runs top to bottom on the embedded default model.

The notebook is executed once (module fixture, ~1 minute on a 2-core CPU) in a temporary copy
through nbclient with the python3 kernel; the tests then check its printed outputs: the PPL table
(HIGGS 4-bit finite, close to fp32 and better than 2-bit), the inline plot, the fused matmul
against the dense weight, and the orbax round trip. The committed file must have no outputs and
match what `scripts/make_notebook.py` builds.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "colab" / "quickstart.ipynb"


def _load_maker():
    spec = importlib.util.spec_from_file_location(
        "make_notebook", REPO_ROOT / "scripts" / "make_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stdout(cell) -> str:
    return "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stdout"
    )


def _cell_output(nb, needle: str) -> str:
    """stdout of the one code cell whose source contains `needle`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    if len(cells) != 1:
        raise AssertionError(f"expected one code cell containing {needle!r}, found {len(cells)}")
    return _stdout(cells[0])


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after execution (a copy in a temp dir, with the repo on PYTHONPATH)."""
    from nbclient import NotebookClient

    work = tmp_path_factory.mktemp("nb")
    path = work / NOTEBOOK.name
    shutil.copy(NOTEBOOK, path)
    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), old]))
    try:
        client = NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        )
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    nbformat.write(nb, work / "executed.ipynb")
    return nb


@pytest.fixture(scope="module")
def ppl_table(executed) -> dict[str, tuple[float, float]]:
    """{method: (bits/weight, PPL)} parsed from the printed perplexity table."""
    rows = {}
    for line in _cell_output(executed, "perplexity(").splitlines():
        m = re.fullmatch(r"(\S.*?)\s+([-+0-9.einfa]+)\s+([-+0-9.einfa]+)", line.strip())
        if m and m.group(1) != "method":
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_committed_notebook_matches_generator():
    assert NOTEBOOK.read_text() == _load_maker().render(), "run python scripts/make_notebook.py"


def test_install_cell_only_installs_in_colab():
    first_code = next(
        c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"
    )
    assert '"google.colab" in sys.modules' in first_code.source
    assert "if IN_COLAB:" in first_code.source


@pytest.mark.parametrize(
    "method", ["fp32", "HIGGS 4b", "HIGGS 3b", "HIGGS 2b", "NF4", "RTN 4b g64"]
)
def test_ppl_table_row_is_finite(ppl_table, method):
    bpw, ppl = ppl_table[method]
    assert math.isfinite(ppl) and ppl > 1.0
    assert 1.0 < bpw <= 32.0


@pytest.mark.parametrize(
    "lo, hi", [("HIGGS 4b", "HIGGS 3b"), ("HIGGS 3b", "HIGGS 2b"), ("HIGGS 4b", "HIGGS 2b")]
)
def test_more_bits_lower_ppl(ppl_table, lo, hi):
    assert ppl_table[lo][1] < ppl_table[hi][1]
    assert ppl_table[lo][0] > ppl_table[hi][0]


def test_higgs4_close_to_fp(ppl_table):
    fp, q4 = ppl_table["fp32"][1], ppl_table["HIGGS 4b"][1]
    assert q4 < 1.1 * fp


def test_plot_is_inline_png(executed):
    outs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outs)


def test_fused_matmul_matches_dense(executed):
    text = _cell_output(executed, "hj.higgs_matmul(")
    m = re.search(r"max abs diff\s+(\S+)", text)
    assert m, text
    assert float(m.group(1)) < 1e-3


def test_jitted_function_runs_on_both_trees(executed):
    text = _cell_output(executed, "def next_token_logits")
    m = re.search(r"max \|logit diff\| fp vs HIGGS 4b:\s+(\S+)", text)
    assert m, text
    diff = float(m.group(1))
    assert math.isfinite(diff) and diff > 0.0  # quantized differs from fp, but is a real number
    m = re.search(r"max \|logit diff\| fused vs dequantized:\s+(\S+)", text)
    assert m, text
    assert float(m.group(1)) < 1e-3  # the fused path computes the dequantized model


def test_generation_decodes_text(executed):
    text = _cell_output(executed, "generate(p, config")
    assert "[fp32] 'Once upon a time" in text
    assert "[HIGGS 4b] 'Once upon a time" in text


def test_orbax_round_trip(executed):
    text = _cell_output(executed, "save_params(")
    assert "restored tree identical: True" in text
