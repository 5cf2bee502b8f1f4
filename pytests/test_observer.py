"""The decision observer (`_core.set_observer`): it sees every load decision as a dict, and an
observer that raises refuses the load before a single opcode runs (it can only refuse more)."""

import pickle


def test_observer_sees_decisions_and_can_only_refuse(run_python, canary):
    path, payload = canary
    proc = run_python(f"""
        import pickle, picklegate
        from picklegate import _core
        seen = []

        def watch(event):
            seen.append(event)
            if event["sha256"] == picklegate.sha256(PAYLOAD):
                raise picklegate.PickleDeniedError("refused by the observer")

        PAYLOAD = {payload!r}
        picklegate.install(mode="warn")
        _core.set_observer(watch)
        assert pickle.loads(pickle.dumps([1])) == [1]
        try:
            pickle.loads(PAYLOAD)
        except picklegate.PickleDeniedError as error:
            print("refused:", error)
        _core.set_observer(None)
        pickle.loads(pickle.dumps([2]))
        print([(e["decision"], e["callsite"], e["size"]) for e in seen])
        print(sorted(seen[1]))
    """, env={"PICKLEGATE_LOG": "/dev/null"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "refused: refused by the observer"
    assert lines[1] == f"[('warn', '__main__:<module>', {len(pickle.dumps([1]))}), ('warn', '__main__:<module>', {len(payload)})]"
    assert lines[2] == str(sorted(["time", "pid", "mode", "decision", "callsite", "sha256", "size", "globals",
                                   "source", "reason"]))
    assert not path.exists(), "the observer's refusal must stop the load before it runs"
