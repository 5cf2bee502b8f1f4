"""Two install() calls, a library's and the application's, in either order: the stricter wins
(issue 11, finding 6), and a record or warn request that wins behaves as asked (issue 10)."""

import json

import pytest

#: Each request, from the loosest to the strictest (enforce with a manifest outranks every mode
#: that refuses nothing; enforce without one refuses every load).
REQUESTS = {
    "off": 'mode="off"',
    "record": 'mode="record", record="{who}.jsonl"',
    "warn": 'mode="warn"',
    "enforce+manifest": 'mode="enforce", policy="{who}.toml"',
    "enforce": 'mode="enforce"',
}
RANK = {name: rank for rank, name in enumerate(REQUESTS)}


@pytest.mark.parametrize("application", list(REQUESTS))
@pytest.mark.parametrize("library", list(REQUESTS))
@pytest.mark.parametrize("first", ["library", "application"])
def test_the_stricter_install_wins_whatever_the_order(first, library, application, run_python, tmp_path, canary):
    path, payload = canary
    (tmp_path / "payload.pkl").write_bytes(payload)
    for who in ("library", "application"):
        (tmp_path / f"{who}.toml").write_text("version = 1\n")
    calls = {"library": REQUESTS[library].format(who="library"), "application": REQUESTS[application].format(who="application")}
    order = [first, "application" if first == "library" else "library"]
    proc = run_python(
        f"""
        import pickle, picklegate
        picklegate.install({calls[order[0]]})
        picklegate.install({calls[order[1]]})
        print(picklegate.state())
        try:
            pickle.loads(open("payload.pkl", "rb").read())
            print("RAN")
        except picklegate.PickleDeniedError:
            print("DENIED")
        """,
        check=True,
    )
    request = {"library": library, "application": application}
    # the stricter wins; at equal strictness (the same request, or two manifests) the first stays
    winner = order[1] if RANK[request[order[1]]] > RANK[request[order[0]]] else order[0]
    winner_name = request[winner]
    mode = winner_name.split("+")[0]
    manifest = f"{winner}.toml" if winner_name == "enforce+manifest" else None
    state, outcome = proc.stdout.splitlines()
    assert state.startswith(f"({mode!r}, {manifest!r}, 'code')"), (state, proc.stderr)
    if mode == "enforce":
        assert outcome == "DENIED" and not path.exists(), proc.stderr
    else:
        assert outcome == "RAN" and path.exists(), proc.stderr
    if RANK[request[order[1]]] < RANK[request[order[0]]]:
        assert "install-ignored" in proc.stderr, proc.stderr
    if mode == "record":
        lines = (tmp_path / f"{winner}.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["callsite"] == "__main__:<module>", lines
    if mode == "warn":
        warned = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        reasons = [event["reason"] for event in warned if event.get("decision") == "warn"]
        assert reasons and not any("enforce mode" in reason for reason in reasons), proc.stderr
