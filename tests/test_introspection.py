"""complete, inspect, is_complete, history, comm_info, debug_request."""

from __future__ import annotations

from tests.harness import plain, start_kernel


def test_complete_uses_the_live_namespace(kernel):
    kernel.execute("capsule_variable_alpha = 1\ncapsule_variable_beta = 2")
    reply = kernel.request("complete", "capsule_variable_", 17)["content"]
    assert reply["status"] == "ok"
    assert {"capsule_variable_alpha", "capsule_variable_beta"} <= set(reply["matches"])
    assert reply["cursor_start"] == 0 and reply["cursor_end"] == 17


def test_complete_attributes_after_disabling_jedi(kernel):
    kernel.execute("%config Completer.use_jedi = False", store_history=False)
    kernel.execute("import os")
    code = "os.pa"
    reply = kernel.request("complete", code, len(code))["content"]
    assert any(m.endswith("path") for m in reply["matches"])


def test_inspect_levels(kernel):
    kernel.execute("def documented(a, b=2):\n    'Adds things up.'\n    return a + b")
    level0 = kernel.request("inspect", "documented", 10, 0)["content"]
    assert level0["found"] is True
    assert "Adds things up." in level0["data"]["text/plain"]
    level1 = kernel.request("inspect", "documented", 10, 1)["content"]
    assert "return a + b" in plain(level1["data"]["text/plain"])
    missing = kernel.request("inspect", "no_such_name_here", 5, 0)["content"]
    assert missing["found"] is False


def test_is_complete(kernel):
    assert kernel.request("is_complete", "x = 1")["content"]["status"] == "complete"
    incomplete = kernel.request("is_complete", "for i in range(3):")["content"]
    assert incomplete["status"] == "incomplete"
    assert incomplete["indent"] == "    "
    assert kernel.request("is_complete", "x = )")["content"]["status"] == "invalid"


def test_history_tail_range_search(kernel):
    codes = ["hist_a = 'needle-1'", "hist_b = 'needle-2'", "hist_c = 'needle-3'"]
    for code in codes:
        kernel.execute(code)
    tail = kernel.request("history", hist_access_type="tail", n=3, output=False, raw=True)["content"]["history"]
    assert [row[2] for row in tail] == codes
    session, start = tail[0][0], tail[0][1]
    ranged = kernel.request(
        "history", hist_access_type="range", session=session, start=start, stop=start + 1, output=False, raw=True
    )
    assert [row[2] for row in ranged["content"]["history"]] == codes[:1]
    found = kernel.request(
        "history", hist_access_type="search", pattern="hist_? = 'needle-*", n=10, output=False, raw=True
    )
    assert {row[2] for row in found["content"]["history"]} >= set(codes)


def test_history_survives_a_kernel_restart(fresh_kernel, tmp_path):
    """History is kept per notebook (session): its sandboxes cannot read another notebook's."""
    session = {"CAPSULE_SESSION": f"history-{tmp_path.name}"}
    first = fresh_kernel(env=session)
    first.execute("persisted_marker = 'kept across kernels'")
    first.close()
    second = start_kernel(cwd=tmp_path, env=session)
    try:
        found = second.request(
            "history", hist_access_type="search", pattern="*kept across kernels*", output=False, raw=True
        )
        assert any("persisted_marker" in row[2] for row in found["content"]["history"])
    finally:
        second.close()


def test_magic_cells_are_in_history_too(kernel):
    kernel.execute("%capsule status")
    tail = kernel.request("history", hist_access_type="tail", n=1, output=False, raw=True)["content"]["history"]
    assert tail[-1][2] == "%capsule status"


def test_debug_requests_get_an_answer(kernel):
    arguments = {"type": "request", "seq": 1, "command": "initialize", "arguments": {}}
    reply = kernel.control("debug_request", arguments)
    assert reply["content"]["success"] is False
    assert "debugger" in reply["content"]["message"]


def test_comm_info_lists_comms_opened_in_the_sandbox(kernel):
    kernel.execute("from comm import create_comm\nc = create_comm(target_name='capsule.test', data={'hello': 1})")
    comms = kernel.request("comm_info", target_name="capsule.test")["content"]["comms"]
    assert len(comms) == 1
    (info,) = comms.values()
    assert info["target_name"] == "capsule.test"
    kernel.execute("c.close()")
    assert kernel.request("comm_info", target_name="capsule.test")["content"]["comms"] == {}


def test_completion_and_inspection_ask_the_sandbox_that_holds_the_name_after_a_mode_switch(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("import collections")
    assert kernel.execute("%capsule mode wasm").status == "ok"
    kernel.execute("w = 1")
    code = "collections.Ord"
    matches = kernel.request("complete", code, len(code))["content"]["matches"]
    assert "OrderedDict" in matches, matches  # as stock ipykernel offers
    inspected = kernel.request("inspect", "collections", len("collections"))["content"]
    assert inspected["found"], inspected


def test_a_wasm_made_objects_dir_runs_only_in_wasm_when_completed_in_subprocess_mode(fresh_kernel):
    kernel = fresh_kernel()
    assert kernel.execute("%capsule mode wasm").status == "ok"
    kernel.execute(
        "import sys\nclass Probe:\n    def __dir__(self):\n        return ['ran_in_' + sys.platform]\nprobe = Probe()"
    )
    assert kernel.execute("%capsule mode subprocess").status == "ok"
    kernel.execute("import os")  # the subprocess sandbox runs now
    code = "probe.ran"
    matches = kernel.request("complete", code, len(code))["content"]["matches"]
    assert "probe.ran_in_linux" not in matches and "ran_in_linux" not in matches, matches
    assert any("ran_in_wasi" in match for match in matches), matches


def test_the_wasm_sandbox_completes_module_names_after_import_as_ipython_does(fresh_kernel):
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm"})
    kernel.execute("x = 1")
    reply = kernel.request("complete", "import o", len("import o"))["content"]
    assert "os" in reply["matches"] and "object" not in reply["matches"], reply["matches"]
    assert reply["cursor_start"] == len("import ")
    typed = reply["metadata"]["_jupyter_types_experimental"]
    assert {"text": "os", "type": "module"}.items() <= next(t for t in typed if t["text"] == "os").items()
    dotted = kernel.request("complete", "import os.pa", len("import os.pa"))["content"]["matches"]
    assert "os.path" in dotted, dotted
    members = kernel.request("complete", "from collections import Ord", 27)["content"]["matches"]
    assert "OrderedDict" in members, members
    # Away from an import, names as before.
    assert "object" in kernel.request("complete", "obj", 3)["content"]["matches"]


def test_the_wasm_sandbox_completes_dict_keys_and_paths_as_ipython_does(fresh_kernel, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "file_one.txt").write_text("1")
    kernel = fresh_kernel(env={"CAPSULE_MODE": "wasm", "CAPSULE_NOTEBOOK_MAY_WIDEN": "mounts"})
    assert kernel.execute(f"%capsule mount {data}").status == "ok"
    kernel.execute("d = {'alpha': 1, 'beta': 2, 3: 'three'}")
    for code, want in (("d['al", "alpha"), ('d["be', "beta")):
        reply = kernel.request("complete", code, len(code))["content"]
        assert reply["matches"] == [want] and reply["cursor_start"] == 3, reply
        assert reply["metadata"]["_jupyter_types_experimental"][0]["type"] == "dict key"
    code = f"open('{data}/"
    reply = kernel.request("complete", code, len(code))["content"]
    assert set(reply["matches"]) == {f"{data}/sub/", f"{data}/file_one.txt"}, reply
    assert reply["cursor_start"] == len("open('")
