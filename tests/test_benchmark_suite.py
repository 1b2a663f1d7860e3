"""The benchmark suite's runner (`python -m benchmarks`): a failing case is recorded, the raw results are kept for
`--resume`, and `--report-only` rebuilds the report from them."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import benchmarks.__main__ as suite
from timo_hf import buffer_pool
from benchmarks.__main__ import main, run_in_process
from benchmarks.allocator import TUNED_MALLOC, environment
from benchmarks.cases import case_memory
from benchmarks.allocator import main as allocator_main
from benchmarks.common import TensorMemory, code_version, time_and_count_runs
from benchmarks.profile import REST_OF_STEP, clock_compiled_step, kind_of, operator_flops
from benchmarks.profile import main as profile_main
from benchmarks.temporal_products import main as temporal_products_main


def test_a_failing_case_is_recorded_and_the_run_goes_on():
    result = run_in_process({"id": "x", "kind": "no_such_kind", "device": "cpu"})
    assert result["error"] == "KeyError: 'no_such_kind'"


def test_resume_keeps_measured_cases_and_report_only_rebuilds_the_report(tmp_path, capsys):
    raw = tmp_path / "raw.json"
    common = ["--only", "matmul_peak", "--in-process", "--idle-wait", "0", "--json", str(raw)]
    main(common + ["--no-write"])
    first = json.loads(raw.read_text())
    peak = suite.measured_peak(first["results"])["flops_per_s"]  # measured at the start and at the end
    assert peak > 0 and set(first["results"]) == {"matmul_peak", "matmul_peak/end"}
    capsys.readouterr()

    assert first["info"]["code"] == code_version(suite.ROOT)
    # As if the first invocation had measured another commit.
    first["info"]["code"] = {"commit": "0123456789abcdef" * 2 + "01234567", "changed": []}
    raw.write_text(json.dumps(first))

    main(common + ["--no-write", "--resume"])
    resumed = json.loads(raw.read_text())
    out = capsys.readouterr().out
    assert "resuming: 2 cases already measured" in out and "[1/2]" not in out
    assert resumed["results"] == first["results"] and resumed["info"]["resumed"] == 1
    assert resumed["info"]["resumed_codes"] == [first["info"]["code"]]
    # Resumed again with the same code: the cases of the first invocation still ran the other commit.
    main(common + ["--no-write", "--resume"])
    assert json.loads(raw.read_text())["info"]["resumed_codes"] == [first["info"]["code"]]
    capsys.readouterr()

    report = tmp_path / "RESULTS.md"
    stale_figure = suite.sweep_figure_path(report)
    stale_figure.write_bytes(b"the figure of an earlier report")
    main(["--report-only", "--json", str(raw), "--output", str(report), "--note", "a remark"])
    text = report.read_text()
    assert "Note: a remark" in text and "the 2 earlier invocation(s) it resumed" in text
    assert "(cases kept from the resumed invocation(s) ran with the code of commit 0123456789ab)" in text
    assert f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s" in text
    # No sweep case was measured: no figure (an earlier one is removed), and the report links none.
    assert not stale_figure.exists() and "![" not in text


def test_the_report_links_a_figure_of_the_sweep_over_t_written_beside_it(tmp_path, capsys):
    results = {
        suite.sweep_case_id(frames, implementation): {
            "time_s": scale * frames * 1e-3, "peak_bytes": scale * frames << 20
        }
        for frames in suite.SWEEP_FRAMES
        for implementation, scale in (("reference", 4), ("fast", 1))
    }
    # A case not measured and one that failed: their points are left out.
    del results[suite.sweep_case_id(32, "fast")]
    results[suite.sweep_case_id(16, "reference")] = {"error": "killed"}
    assert suite.sweep_series(results)["fast"] == [(t, t * 1e-3, t << 20) for t in suite.SWEEP_FRAMES[:-1]]
    assert [point[0] for point in suite.sweep_series(results)["reference"]] == [2, 4, 8, 32]
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"info": {"date": "today", "command": "test", "load_before": "0", "load_after": "0"},
                               "results": results}))
    report = tmp_path / "RESULTS-x.md"
    main(["--report-only", "--json", str(raw), "--output", str(report)])
    figure = tmp_path / "RESULTS-x-dstga-over-T.png"
    assert f"written {report} and {figure}" in capsys.readouterr().out
    assert "![D-STGA time and memory over T](RESULTS-x-dstga-over-T.png)" in report.read_text()
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 300


def test_a_run_records_the_commit_and_the_uncommitted_changes_of_the_code_it_measures(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "kernel.py").write_text("A = 1\n")
    assert code_version(repo) == {"commit": None}

    def git(*args):
        command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / ".gitignore").write_text("*.log\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    assert code_version(repo) == {"commit": commit, "changed": []}
    (repo / "kernel.py").write_text("A = 2\n")
    (repo / "new_module.py").write_text("")
    (repo / "run.log").write_text("ignored")
    assert code_version(repo) == {"commit": commit, "changed": ["kernel.py", "new_module.py"]}

    info = {"date": "today", "command": "test", "load_before": "0", "load_after": "0", "code": code_version(repo)}
    report = suite.build_report({}, info)
    assert f"with the code of commit {commit[:12]}, plus uncommitted changes to `kernel.py`, `new_module.py`." in report
    outside = suite.build_report({}, {**info, "code": {"commit": None}})
    assert "(test) with code outside a git checkout (its commit is not known). Every number" in outside
    # Raw results of runs that did not record the code: the report says nothing of it.
    assert "(test). Every number" in suite.build_report({}, {key: info[key] for key in info if key != "code"})


@pytest.mark.parametrize("option", ["--processes", "--repeats"])
def test_no_processes_or_repeats_is_refused(option, capsys):
    with pytest.raises(SystemExit):
        main(["--only", "attention/dstga/T30-48px/fwd/fast", option, "0", "--no-write"])
    assert "--repeats and --processes must be at least 1" in capsys.readouterr().err


def test_fractions_of_the_peak_use_the_higher_of_the_two_peak_measurements():
    """The matmul peak is measured at the start and at the end of a run; the report judges against the higher."""
    cases = [case["id"] for case in suite.all_cases("cpu", repeats=1)]
    assert cases[0] == "matmul_peak" and cases[-1] == "matmul_peak/end"
    start = {"matmul_peak": {"flops_per_s": 1.5e11, "size": 2048}}
    end = {"matmul_peak": {"flops_per_s": 1.8e11, "size": 4096}}
    assert suite.measured_peak({"matmul_peak": start, "matmul_peak/end": end}) == {
        "flops_per_s": 1.8e11, "size": 4096, "rates": [1.5e11, 1.8e11]
    }
    assert suite.measured_peak({"matmul_peak": start})["rates"] == [1.5e11]  # raw results of an older run
    assert suite.measured_peak({}) is None


def test_the_report_rounds_ratios_and_fractions_down_so_a_shown_target_is_a_met_one():
    assert [suite._fmt_ratio(value) for value in (4.996, 5.0, 2.29)] == ["4.99x", "5.00x", "2.29x"]
    shares = [suite._peak_share({"flops": flops, "time_s": 1.0}, 1.0) for flops in (0.4996, 0.5)]
    assert shares == ["49.9%", "50.0%"]


def test_compiled_cpu_cases_report_no_tensor_peak_only_the_resident_set_growth():
    """Compiled code allocates outside the dispatcher: on CPU only the resident set's growth is known, which is no
    peak, and the progress line says so."""
    memory = case_memory(lambda: torch.ones(1 << 20).sum(), {"compile": True, "device": "cpu"})
    assert set(memory) == {"peak_resident_bytes"}
    assert "resident set grew" in suite.describe({"time_s": 0.01, **memory})
    assert "peak 1.0 MiB" in suite.describe({"time_s": 0.01, "peak_bytes": 1 << 20})


def test_report_only_without_raw_results_names_the_missing_file(tmp_path, capsys):
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit):
        main(["--report-only", "--json", str(missing)])
    assert f"no raw results at {missing}" in capsys.readouterr().err


def test_profile_splits_a_step_into_matrix_products_and_the_rest(capsys):
    profile_main(["attention/dstga/T30-48px/fwd/fast", "--steps", "1", "--rows", "50"])
    out = capsys.readouterr().out
    # D-STGA's shared spatial softmax applied to all 30 frames' values at once: one [N, N] x [N, T*d] product per head.
    assert "| aten::bmm | [[4, 144, 144], [4, 144, 960]" in out
    shares = [line for line in out.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in shares] == [
        "- matrix products", "- fused attention", "- generated kernels", "- everything else", "- measured matmul peak"
    ]
    assert "of the measured matmul peak" in shares[0]


def test_profile_names_cases_like_an_unknown_one():
    with pytest.raises(SystemExit, match="cases like it: attention/dstga/T30-48px/fwd/fast"):
        profile_main(["attention/dstga/T30-48px/fwd/fas"])
    with pytest.raises(SystemExit, match="no case 'nothing/alike'; python -m benchmarks --list names them"):
        profile_main(["nothing/alike"])
    with pytest.raises(SystemExit, match="a layout_memory case, which is not profiled"):
        profile_main(["layout_memory/M-M-M-M/B2-T3-256px/fwdbwd/fast"])


def test_profile_refuses_no_steps(capsys):
    with pytest.raises(SystemExit):
        profile_main(["attention/dstga/T30-48px/fwd/fast", "--steps", "0"])
    assert "--steps and --rows must be at least 1 (got --steps 0, --rows 20)" in capsys.readouterr().err


def test_temporal_products_times_both_widths_and_names_the_kernels_choice(capsys):
    rows = temporal_products_main(["--frames", "7", "12", "--tokens", "4", "--repeats", "2"])
    assert [(row["frames"], row["padded_frames"], row["chosen"]) for row in rows] == [(7, 8, True), (12, 16, False)]
    assert all(row["unpadded_ms"] > 0 and row["padded_ms"] > 0 for row in rows)
    assert "| 7 | 8 | yes |" in capsys.readouterr().out
    for bad in (["--frames", "0"], ["--head-dim", "0"]):
        with pytest.raises(SystemExit):
            temporal_products_main(bad)
    assert "--head-dim and --repeats must be at least 1" in capsys.readouterr().err


def test_allocator_runs_each_case_under_each_memory_setting(monkeypatch, capsys):
    # Settings of the caller's own are not carried into the runs of other settings.
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert not {*TUNED_MALLOC, "THP_MEM_ALLOC_ENABLE"} & set(environment("default"))
    assert all(environment("tuned")[name] == value for name, value in TUNED_MALLOC.items())
    assert environment("thp")["THP_MEM_ALLOC_ENABLE"] == "1" and not set(TUNED_MALLOC) & set(environment("thp"))
    case = "attention/stga/T30-48px/fwd/fast"
    results = allocator_main(["--only", case, "--rounds", "1", "--repeats", "1", "--idle-wait", "0"])
    runs = results[case]
    assert {setting: len(runs[setting]) for setting in runs} == {"default": 1, "tuned": 1, "thp": 1}
    assert all(run["time_s"] > 0 and run["minor_faults_per_run"] >= 0 for setting in runs for run in runs[setting])
    assert f"| {case} |" in capsys.readouterr().out


def test_readme_recommends_the_malloc_tunables_the_allocator_script_measures():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "export " + " ".join(f"{name}={value}" for name, value in TUNED_MALLOC.items()) in readme


def test_allocator_refuses_unknown_cases():
    with pytest.raises(SystemExit):
        allocator_main(["--only", "attention/dstga/T30-48px/fwdbwd/fas"])


def test_compared_cases_alternate_process_by_process_and_the_report_gives_each_rounds_ratio(monkeypatch):
    """The processes of the cases a ratio compares run in rounds, the order reversed every other round; each case
    pools its processes' timed runs and keeps each process's median and page faults, and the report divides the
    medians round by round."""
    ids = ["attention/dstga/T30-48px/fwdbwd/reference", "attention/dstga/T30-48px/fwdbwd/fast"]
    medians = {ids[0]: iter([0.06, 0.08, 0.07]), ids[1]: iter([0.03, 0.02, 0.05])}
    order = []

    def fake_run_case(case, timeout, idle_wait):
        order.append(case["id"])
        median = next(medians[case["id"]])
        return {"times_s": [median - 0.001, median + 0.001], "time_s": median, "minor_faults_per_run": 1e3 * median}

    monkeypatch.setattr(suite, "run_case", fake_run_case)
    cases = [{"id": case_id, "kind": "attention", "processes": 3} for case_id in ids]
    assert {suite.comparison_group(case) for case in cases} == {"attention/dstga/T30-48px/fwdbwd"}
    results = suite.run_group(cases, timeout=1, idle_wait=0)
    assert order == [ids[0], ids[1], ids[1], ids[0], ids[0], ids[1]]
    fast = results[ids[1]]
    assert fast["process_times_s"] == [0.03, 0.02, 0.05] and fast["time_s"] == pytest.approx(0.03)
    assert fast["process_minor_faults_per_run"] == [30.0, 20.0, 50.0] and fast["minor_faults_per_run"] == 30.0
    assert results[ids[0]]["interleaved_with"] == fast["interleaved_with"] == ids
    assert suite.round_ratios(results[ids[0]], fast) == pytest.approx([2.0, 4.0, 1.4])
    # A case kept from an earlier invocation did not run side by side with the other: no ratios per round.
    assert suite.round_ratios({**results[ids[0]], "interleaved_with": ids[:1]}, fast) == []
    info = {"date": "today", "command": "test", "load_before": "0", "load_after": "0"}
    report = suite.build_report({case_id: {**result, "peak_bytes": 1} for case_id, result in results.items()}, info)
    assert "| D-STGA stage-1 fwd+bwd speed-up, T=30 48px, eager | 2.33x | >= 2x | met | 2.00x, 4.00x, 1.40x |" in report


def test_timed_runs_count_the_page_faults_of_each_timed_call():
    """Each timed call that touches 64 MiB of fresh memory (mapped per allocation: above glibc's mmap threshold)
    faults in about 16 Ki pages; the warm-up calls are not counted."""
    calls = []

    def touch_fresh_memory():
        calls.append(torch.ones(16 * 2**20).sum())

    times, faults = time_and_count_runs(touch_fresh_memory, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == len(faults) == 3
    pages = 64 * 2**20 // 4096
    assert all(0.9 * pages <= count <= 1.5 * pages for count in faults), faults


def test_profile_counts_in_place_products_as_matrix_products():
    """`baddbmm_` (the spatial backward accumulating over its blocks) is a matrix product with its FLOPs counted,
    although the profiler counts none for it."""
    accumulated, left, right = torch.zeros(3, 16, 8), torch.randn(3, 16, 32), torch.randn(3, 32, 8)
    with torch.profiler.profile(record_shapes=True, with_flops=True) as profiler:
        for _ in range(2):
            accumulated.baddbmm_(left, right)
    (event,) = [event for event in profiler.key_averages(group_by_input_shape=True) if event.key == "aten::baddbmm_"]
    assert kind_of(event.key) == "matrix products"
    assert operator_flops(event) == 2 * (2 * 3 * 16 * 32 * 8)


def test_compiled_steps_are_clocked_kernel_by_kernel_without_the_profiler():
    """A compiled step's rows: each generated kernel by name, each library product with its shapes and FLOPs, and the
    rest of the step. The generated module is left as it was."""
    left, right = torch.randn(576, 30, 32), torch.randn(576, 32, 32)
    compiled = torch.compile(lambda left, right: torch.bmm(left, right).relu() * 2, fullgraph=True)
    compiled(left, right)
    module = next(module for module in sys.modules.values() if compiled_product_kernel(module))
    kernel = compiled_product_kernel(module)

    externs = module.extern_kernels
    rows = clock_compiled_step(lambda: compiled(left, right), steps=3)

    by_name = {name: (milliseconds, calls, flops, shapes) for milliseconds, calls, flops, name, shapes in rows}
    assert by_name["aten::bmm"][1:] == (1, 2 * 576 * 30 * 32 * 32, "[[576, 30, 32], [576, 32, 32]]")
    generated = [name for name in by_name if "cpp_fused" in name]
    assert generated and all(name.startswith("graph ") and kind_of(name) == "generated kernels" for name in generated)
    assert all(by_name[name][:2] > (0, 0) for name in ("aten::bmm", *generated))
    # The rest: the step's clocked time less the calls'.
    assert kind_of(REST_OF_STEP) == "everything else" and by_name[REST_OF_STEP][0] >= 0
    assert compiled_product_kernel(module) is kernel and module.extern_kernels is externs


def compiled_product_kernel(module):
    """The generated kernel of `test_compiled_steps_are_clocked...`'s product, if `module` holds it."""
    return next((value for name, value in vars(module).items() if name.startswith("cpp_fused_mul_relu")), None)


def test_attention_cases_count_the_flops_of_the_products_they_run():
    """Each attention case reports the FLOPs of the matrix products it runs, backward included. D-STGA's fast kernel
    saves element-wise work and memory, not products: it runs the reference's products, plus the spatial logits it
    recomputes in backward and the keys' two zero frames (30 padded to 32), so the counts agree within 3%."""
    cases = {case["id"]: case for case in suite.all_cases("cpu", repeats=1)}
    counted = {
        implementation: run_in_process(cases[f"attention/dstga/T30-48px/fwdbwd/{implementation}"])["flops"]
        for implementation in ("reference", "fast")
    }
    assert 0 < counted["reference"] < counted["fast"] < 1.03 * counted["reference"]


def test_tensor_memory_does_not_count_tensors_made_before_the_block():
    """Views, in-place results and `out=` results of an input or weight are not new memory; a product's output is.
    A pooled buffer of the fast kernels counts whole while a tensor uses it, not while it waits in the pool."""
    inputs, linear = torch.randn(256, 256), torch.nn.Linear(256, 256)
    nbytes = inputs.nbytes
    with TensorMemory() as memory:
        inputs.view(-1)
        inputs.mul_(1.0)
        torch.mul(inputs, 2.0, out=inputs)
        inputs[:128].t()
    assert memory.peak_bytes == 0
    with TensorMemory() as memory:
        linear(inputs)  # its weight is transposed (a view) for the product
    assert memory.peak_bytes == nbytes

    buffer_pool.release_buffers()  # a larger buffer left by another test would be handed out (and count whole)
    with buffer_pool.pooling(True), torch.no_grad():
        with TensorMemory() as memory:
            pooled = buffer_pool.pooled_empty((256, 256), torch.float32, inputs)  # made here, then pooled
            torch.mul(inputs, 2.0, out=pooled)
            torch.mul(inputs, 3.0)
        assert memory.peak_bytes == 2 * nbytes
        del pooled  # back in the pool, waiting: no longer counted
        with TensorMemory() as memory:
            torch.mul(inputs, 2.0)
        assert memory.peak_bytes == nbytes
        with TensorMemory() as memory:
            torch.mul(inputs, 2.0, out=buffer_pool.pooled_empty((256, 256), torch.float32, inputs))
        assert memory.peak_bytes == nbytes
    buffer_pool.release_buffers()


def test_tensor_memory_counts_the_peak_and_the_gradient_sum_a_plain_run_makes_in_place():
    """The tensor peak counts what the block creates and holds at once; where two gradients of one tensor meet,
    autograd adds one to the other in place in a plain run but makes their sum anew under a dispatch mode (as the
    report says: such a sum counts as one tensor more)."""
    with TensorMemory() as memory:
        held = [torch.empty(256, 256) for _ in range(3)]
    assert memory.peak_bytes == 3 * held[0].numel() * held[0].element_size()
    leaf = torch.randn(256, 256, requires_grad=True)

    def gradient_sums(mode) -> set[str]:
        with torch.profiler.profile() as profiler, mode:
            twice = leaf * 2
            torch.autograd.grad((twice.exp() + twice.sin()).sum(), leaf)  # `twice` gets two gradients
        return {event.name for event in profiler.events() if event.name in ("aten::add", "aten::add_")}

    # The forward's sum, then (plain run) the gradients added in place.
    assert gradient_sums(contextlib.nullcontext()) == {"aten::add", "aten::add_"}
    assert gradient_sums(TensorMemory()) == {"aten::add"}
