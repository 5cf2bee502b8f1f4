"""Red-team pass 2, A02: torch.load(io.BytesIO(...), weights_only=True) (torch's default) unpickles
with torch's own pure-Python unpickler, which Python's pickle never sees: under enforce it loaded
unlisted bytes with no decision. Its pickle is now judged on its own bytes, as with weights_only=False.
"""

from conftest import write_manifest

LOAD = """
import io, torch, picklegate
buffer = io.BytesIO()
torch.save({"w": torch.arange(3)}, buffer)

def load_weights(weights_only):
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=weights_only)

for weights_only in (True, False):
    try:
        print("loaded", load_weights(weights_only)["w"].tolist())
    except picklegate.PickleDeniedError as error:
        print("denied", error.callsite, error.sha256)
"""


def test_a_weights_only_torch_load_of_a_buffer_is_judged(run_python, tmp_path):
    write_manifest(tmp_path / "empty.toml")
    env = {"PICKLEGATE_POLICY": str(tmp_path / "empty.toml"), "PICKLEGATE_MODE": "enforce"}
    lines = run_python(LOAD, env=env, check=True).stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["denied", "__main__:load_weights"]] * 2, lines
    _, callsite, sha = lines[0].split()
    assert lines[1].split()[2] == sha  # the same pickle, whichever unpickler torch uses
    write_manifest(tmp_path / "listed.toml", (sha, callsite))
    env["PICKLEGATE_POLICY"] = str(tmp_path / "listed.toml")
    assert run_python(LOAD, env=env, check=True).stdout.splitlines() == ["loaded [0, 1, 2]"] * 2
