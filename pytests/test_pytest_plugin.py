"""The pytest plugin (issue 4, acceptance 4), run on a sample suite in a fresh pytest process:
enforce fails exactly the test that loads an unlisted pickle, even when it swallows the error."""

import hashlib
import json
import pickle

SAMPLE_SUITE = '''
import collections, pickle, pytest

APPROVED = pickle.dumps(collections.OrderedDict(a=1))
UNLISTED = pickle.dumps({"unlisted": True})
MARKED = pickle.dumps({"marked": 1})

def test_no_pickles():
    assert 1 + 1 == 2

def test_approved_load():
    assert pickle.loads(APPROVED)["a"] == 1

def test_unlisted_load_swallowed():
    try:
        pickle.loads(UNLISTED)
    except Exception:
        pass

@pytest.mark.picklegate(allow=["sha256:MARKED_SHA"])
def test_marked_load():
    assert pickle.loads(MARKED) == {"marked": 1}
'''


def sha(obj):
    return hashlib.sha256(pickle.dumps(obj)).hexdigest()


def make_suite(pytester):
    import collections

    pytester.makepyfile(test_sample=SAMPLE_SUITE.replace("MARKED_SHA", sha({"marked": 1})))
    policy = pytester.path / "pickles.toml"
    policy.write_text(
        f'version = 1\n\n[[allow]]\nsha256 = "{sha(collections.OrderedDict(a=1))}"\n'
        f'callsite = "test_sample:test_approved_load"\n')
    return policy


def test_enforce_fails_only_the_unlisted_load(pytester):
    policy = make_suite(pytester)
    result = pytester.runpytest_subprocess("--picklegate=enforce", "--picklegate-policy", str(policy))
    result.assert_outcomes(passed=3, failed=1)
    output = result.stdout.str()
    assert "FAILED test_sample.py::test_unlisted_load_swallowed" in output
    assert f'sha256 = "{sha({"unlisted": True})}"' in output
    assert 'callsite = "test_sample:test_unlisted_load_swallowed"' in output


def test_without_the_option_nothing_is_activated(pytester):
    make_suite(pytester)
    pytester.makepyfile(test_state="import picklegate\n\ndef test_not_installed():\n    assert picklegate.state() is None\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=5)


def test_report_prints_the_inventory(pytester):
    make_suite(pytester)
    result = pytester.runpytest_subprocess("--picklegate=report")
    result.assert_outcomes(passed=4)
    output = result.stdout.str()
    assert "picklegate inventory: 3 pickle loads" in output
    row = next(line for line in output.splitlines() if line.startswith("test_sample.py::test_approved_load"))
    import collections

    assert row.split()[1:] == ["test_sample:test_approved_load", sha(collections.OrderedDict(a=1)),
                               str(len(pickle.dumps(collections.OrderedDict(a=1)))), "collections.OrderedDict"]


def test_record_writes_the_record_file(pytester):
    make_suite(pytester)
    record = pytester.path / "records.jsonl"
    result = pytester.runpytest_subprocess("--picklegate=record", "--picklegate-record", str(record))
    result.assert_outcomes(passed=4)
    callsites = sorted(json.loads(line)["callsite"] for line in record.read_text().splitlines())
    assert callsites == ["test_sample:test_approved_load", "test_sample:test_marked_load",
                         "test_sample:test_unlisted_load_swallowed"]
    usage = pytester.runpytest_subprocess("--picklegate=record")
    assert "--picklegate=record needs --picklegate-record PATH" in usage.stderr.str()


def test_warn_lets_every_test_pass_and_lists_the_unlisted_loads(pytester):
    policy = make_suite(pytester)
    result = pytester.runpytest_subprocess("--picklegate=warn", "--picklegate-policy", str(policy))
    result.assert_outcomes(passed=4)
    output = result.stdout.str()
    assert "picklegate: 2 loads the policy does not allow" in output
    assert "test_sample.py::test_unlisted_load_swallowed" in output and "test_sample.py::test_marked_load" in output
