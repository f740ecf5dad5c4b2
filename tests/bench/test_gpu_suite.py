"""bench/gpu_suite.py: the plan, the compact data copy and the CPU dry mode of the one-command GPU session."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / 'bench' / 'gpu_suite.py'
ENV = {k: v for k, v in os.environ.items() if k != 'OUT'}  # $OUT would be the default --out
ENV.update(OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
# the tiny dry mode: 242 training images (rho 100, largest class 100), 20 test images per class, 2 epochs
DRY = ['--device', 'cpu', '--no-install', '--epochs', '2', '--imb-max', '100', '--methods', 'ce', 'ce_cmo',
       '--seeds', '0', '--timing-epochs', '1']
STEP_ORDER = ['install', 'check', 'graph_check', 'mixing', 'speed_paths', 'speed_bf16_cl', 'speed_bf16_cl_compile',
              'graph_speed', 'probe', 'runs', 'summary', 'pack']
# the paper's CIFAR-10-LT table in its order (issue 29): four losses each as is, + ROS, + Remix, + CMO; BS and BS + CMO;
# then the second stages
TABLE = ['ce', 'ce_ros', 'ce_remix', 'ce_cmo', 'ce_drw', 'ce_drw_ros', 'ce_drw_remix', 'ce_drw_cmo', 'ldam_drw',
         'ldam_drw_ros', 'ldam_drw_remix', 'ldam_drw_cmo', 'ride', 'ride_ros', 'ride_remix', 'ride_cmo', 'bs', 'bs_cmo',
         'ce_drw_cmo_las', 'ride_router']


def run_suite(*argv, timeout=900):
    return subprocess.run([sys.executable, str(SUITE), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=str(REPO))


@pytest.fixture(scope='module')
def gpu_suite():
    """The module itself, for its planning functions (it imports bench/common.py as ``common``)."""
    sys.path.insert(0, str(REPO / 'bench'))
    try:
        spec = importlib.util.spec_from_file_location('gpu_suite', SUITE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / 'bench'))
    return module


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory, cifar10_dir):
    """The compact copy made by --prepare-data, tiny: rho 100 capped at 100 images, 20 test images per class."""
    dest = tmp_path_factory.mktemp('data') / 'cifar10_lt_r100'
    proc = run_suite('--prepare-data', dest, '--data-dir', cifar10_dir, '--imb-max', '100', '--test-per-class', '20')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest


def returned_files(out: Path):
    """What the device tool brings back from $OUT: at most 8 plain files, plain names, no deeper than 2 folders."""
    files = [p for p in out.rglob('*') if p.is_file()]
    assert len(files) <= 8
    for f in files:
        rel = f.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r'[A-Za-z0-9._-]+', part) for part in rel.parts), rel
        assert f.stat().st_size < 16 * 2 ** 20
    return sorted(str(f.relative_to(out)) for f in files)


def plan_rows(text: str):
    """(name, estimated seconds) of each step line of a plan: ``<step> <name> <est. s> <at s> <what>``."""
    return [(m.group(1), float(m.group(2))) for m in re.finditer(
        r'^(?:\[\s*[\d.]+s\] )?[0-4]\s+(\w+)\s+(\d+)\s+\d+\s', text, re.M)]


# --- planning -------------------------------------------------------------------------------------

def test_lt_counts_match_the_library(gpu_suite):
    from timm_cmo.data.dataset import long_tail_counts
    for rho, imb_max in ((100, None), (100, 100), (50, 30), (10, None)):
        assert gpu_suite.lt_counts(rho, imb_max) == long_tail_counts(min(5000, imb_max or 5000), 10, rho)
    assert sum(gpu_suite.lt_counts(100, None)) == 12406


def test_simulate_and_choose_parallel(gpu_suite):
    assert gpu_suite.simulate(5, 2, 10., 25.) == [0., 0., 10., 10., None]
    assert gpu_suite.simulate(3, 1, 10., 5.) == [None, None, None]
    # run 2 (a second stage, 3 s) starts from run 0: not before it ends; run 3 from run 1, which does not fit
    assert gpu_suite.simulate(4, 2, [10., 30., 3., 3.], 20., after=[None, None, 0, 1]) == [0., None, 10., None]
    # one run takes 100 s alone, and 100 * (1 + 0.4 (p - 1)) with p at once: in 300 s, 6 at once finish all 6
    cost = lambda p: 100. * (1 + 0.4 * (p - 1))  # noqa: E731
    assert gpu_suite.choose_parallel(6, 6, cost, 300.) == 6
    # no gain from running several at once: one at a time finishes as many, sooner each
    assert gpu_suite.choose_parallel(6, 6, lambda p: 100. * p, 300.) == 1
    assert gpu_suite.choose_parallel(6, 6, cost, 50.) == 1  # nothing fits: the smallest


def test_cost_model_uses_measurements(gpu_suite):
    guess = gpu_suite.CostModel('cuda', 12406, 10000)
    measured = gpu_suite.CostModel('cuda', 12406, 10000, dict(
        proc_start_s=5., decode_s_per_image=1e-4, variants={'fp32': dict(s_per_image=1e-5)},
        parallel=dict(p=4, slope=0.5, startup_factor=1.), step_s={'summary': 3., 'pack': 1.}))
    assert guess.source == 'guessed' and measured.source == 'measured'
    assert measured.s_per_image('fp32', 3) == pytest.approx(2e-5)
    epochs = 97 * 128 * 1e-5 * 200  # 97 batches per epoch (the last batch kept)
    evals = 21 * 10000 * 1e-5 / 3
    assert measured.run_s('fp32', 1, 200, 10) == pytest.approx(5. + 1e-4 * 22406 + epochs + evals)
    assert measured.fixed_s('summary') == 3. and guess.fixed_s('summary') == gpu_suite.GUESSES['cuda']['summary_s']
    # finished runs of an earlier session took 1.2x and 1.4x train_speed.py's seconds per epoch (fp32 at 2 at a
    # time, bf16_cl alone): the next plan's runs, of either variant, take the median, 1.3x
    m = dict(measured.m, runs=dict(observed=[
        dict(variant='fp32', parallel=2, s_per_epoch=1.2 * 1.5e-5 * 97 * 128),
        dict(variant='bf16_cl', parallel=1, s_per_epoch=1.4 * 0.5e-5 * 97 * 128)]))
    m['variants'] = dict(m['variants'], bf16_cl=dict(s_per_image=0.5e-5))
    seen = gpu_suite.CostModel('cuda', 12406, 10000, m)
    assert seen.run_factor() == pytest.approx(1.3) and measured.run_factor() == 1.
    assert seen.run_s('fp32', 1, 200, 10) == pytest.approx(5. + 1e-4 * 22406 + 1.3 * (epochs + evals))


def test_install_finds_a_too_old_timm_and_installs_it_from_the_wheels_folder(gpu_suite, monkeypatch, tmp_path):
    # the GPU image had timm 1.0.29, which lacks timm.models._input: setup.py asks for more
    from importlib import metadata
    real = metadata.version
    monkeypatch.setattr(metadata, 'version', lambda name: '1.0.29' if name == 'timm' else real(name))
    missing = gpu_suite.missing_requirements()
    timm_req = re.search(r"'(timm>=[0-9.]+)'", (REPO / 'setup.py').read_text()).group(1)
    assert missing == [f'{timm_req} (have 1.0.29)']
    wheels = tmp_path / 'wheels'
    without = gpu_suite.install_command(missing, wheels)  # no folder: the package index
    assert without[-4:] == ['--timeout', '15', '-e', '.[test]']
    wheels.mkdir()
    assert gpu_suite.install_command(missing, wheels) == without  # a folder without the wheel
    (wheels / 'timm-1.0.31-py3-none-any.whl').write_bytes(b'')
    # a test extra missing too (no wheel of it): timm is still installed, from the folder only
    offline = gpu_suite.install_command(missing + ['scipy'], wheels)
    assert offline[1:] == ['-m', 'pip', 'install', '--no-index', '--find-links', str(wheels), timm_req]


def test_paths_in_the_log_name_no_machine_folder(gpu_suite, monkeypatch, tmp_path):
    # the GPU machine's $OUT is a folder of that machine: the stored log says $OUT instead
    monkeypatch.setenv('OUT', str(tmp_path / 'out'))
    assert gpu_suite.show(tmp_path / 'out') == '$OUT'
    assert gpu_suite.show(tmp_path / 'out' / 'gpu_suite.tar.gz') == '$OUT/gpu_suite.tar.gz'
    assert gpu_suite.show(REPO / 'shared' / 'data') == 'shared/data'
    assert gpu_suite.show(tmp_path / 'outside') == str(tmp_path / 'outside')  # neither: as given
    monkeypatch.delenv('OUT')
    assert gpu_suite.show(tmp_path / 'out' / 'gpu_suite.tar.gz') == str(tmp_path / 'out' / 'gpu_suite.tar.gz')


def test_plan_only_lists_the_steps_in_order_and_runs_nothing(tmp_path):
    proc = run_suite('--plan-only', '--work', tmp_path / 'work', '--out', tmp_path / 'out')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    assert [name for name, _ in rows] == STEP_ORDER
    assert all(est >= 0 for _, est in rows) and sum(est for _, est in rows) > 0
    runs = re.findall(r'^\s+(\w+-s\d)\s+\d+', proc.stdout, re.M)
    assert runs == [f'{m}-s{s}' for s in (0, 1) for m in TABLE]  # seed 0 of every cell before any seed 1
    # the graph-safe step, planned for the runs once its self-check passes; second stages after their first stage
    assert '--cuda-graph (bf16_cl_graph if its self-check passes)' in proc.stdout
    assert re.search(r'ce_drw_cmo_las-s0 .*10 epochs from ce_drw_cmo-s0', proc.stdout)
    assert re.search(r'ride_router-s0 .*5 epochs from ride-s0', proc.stdout)
    fit = [m.group(1) for m in re.finditer(r'^\s+(\w+-s\d)\s+\d+\s+\d+\s+start at', proc.stdout, re.M)]
    assert fit and fit[0] == 'ce-s0'
    seed0 = [r for r in runs if r.endswith('-s0')]
    assert not any(r.endswith('-s1') for r in fit) or set(seed0) <= set(fit)  # no seed 1 before all of seed 0
    assert 'budget 540s' in proc.stdout and '200 epochs' in proc.stdout and '12,406 training images' in proc.stdout
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'out').exists()


# --- the compact data copy ------------------------------------------------------------------------

def test_compact_copy_gives_the_same_images_in_the_same_order(tiny_data, cifar10_dir):
    import torch

    from timm_cmo.data import create_lt_dataset
    from timm_cmo.data.device_loader import decode_to_tensor
    manifest = json.loads((tiny_data / 'manifest.json').read_text())
    assert manifest['class_counts'] == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1] and manifest['test_images'] == 200
    assert manifest['same_order_as_source'] and manifest['rho'] == 100 and manifest['imb_max'] == 100
    full = create_lt_dataset('', str(cifar10_dir / 'train.tar'), imb_ratio=100, imb_max=100)
    compact = create_lt_dataset('', str(tiny_data), imb_ratio=100, imb_max=100)
    x_full, y_full = decode_to_tensor(full, (32, 32), torch.device('cpu'))
    x_compact, y_compact = decode_to_tensor(compact, (32, 32), torch.device('cpu'))
    assert torch.equal(x_full, x_compact) and torch.equal(y_full, y_compact)
    with tarfile.open(tiny_data / 'test.tar') as tf:
        assert len([m for m in tf.getmembers() if m.isfile()]) == 200


# --- the dry mode (what CI runs) --------------------------------------------------------------------

@pytest.mark.slow
def test_dry_mode_runs_every_step_and_packs_the_results(tiny_data, tmp_path):
    out = tmp_path / 'out'
    # the runs with the graph-safe step's CPU stand-in (--cuda-graph on the CPU), after its self-check passed
    proc = run_suite(*DRY, '--data-dir', tiny_data, '--work', tmp_path / 'work', '--out', out,
                     '--run-variant', 'fp32_graph')
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert returned_files(out) == ['gpu_suite.tar.gz', 'gpu_suite_log.txt', 'gpu_suite_summary.md']
    log = (out / 'gpu_suite_log.txt').read_text()
    rows = plan_rows(log.split('re-plan')[0])
    assert [name for name, _ in rows] == ['install', 'check', 'graph_check', 'mixing', 'speed_paths', 'graph_speed',
                                          'probe', 'runs', 'summary', 'pack']
    for step in ('check', 'graph_check', 'mixing', 'speed_paths', 'graph_speed', 'probe', 'runs', 'summary', 'pack'):
        assert re.search(rf'\] \d {step}: done in', log), step
    assert re.search(r'graph_check: done .*graph-safe = eager over 2 steps x 2 epochs \(the eager CPU stand-in\)', log)
    assert re.search(r'graph_speed: done .*batch 32: [\d.]+ -> [\d.]+ ms/step .*aten operators/step', log)
    assert 'install: skipped; --no-install' in log and 're-plan at' in log
    with tarfile.open(out / 'gpu_suite.tar.gz') as tf:
        names = set(tf.getnames())
        table = tf.extractfile('gpu_suite/runs/table.md').read().decode()
        measured = json.loads(tf.extractfile('gpu_suite/measured.json').read())
    for name in ('plan.txt', 'log.txt', 'summary.md', 'measured.json', 'timings/mixing_cost.json',
                 'timings/graph_check.json', 'timings/graph_speed.json',
                 'timings/train_speed_paths.json', 'timings/train_speed_parallel2_0.json', 'runs/table.md',
                 'runs/per_class_ce.png', 'runs/ce-s0/results.json', 'runs/ce-s0/summary.csv',
                 'runs/ce-s0/per_class_accuracy.png', 'runs/ce_cmo-s0/results.json', 'runs/ce_cmo-s0/train.log'):
        assert f'gpu_suite/{name}' in names, name
    assert not any(n.endswith('.pth.tar') for n in names)
    assert re.search(r'^\| CE \| 0 \| [\d.]+ \|', table, re.M) and re.search(r'^\| CE \+ CMO \| 0 \| [\d.]+ \|', table,
                                                                              re.M)
    assert 'CE + CMO vs CE' in table
    summary = (out / 'gpu_suite_summary.md').read_text()
    assert re.search(r'^\| ce-s0 \| done \| 2 \|', summary, re.M) and re.search(r'^\| ce_cmo-s0 \| done \| 2 \|',
                                                                               summary, re.M)
    assert '| speed_paths | fast | on |' in summary and table.strip() in summary
    assert measured['variants']['fp32']['s_per_image'] > 0 and measured['parallel']['p'] == 2
    assert set(measured['step_s']) >= {'check', 'mixing', 'speed_paths', 'probe', 'summary'}
    # the finished runs' seconds per epoch, for the next session's --estimates
    observed = measured['runs']['observed']
    assert sorted(o['name'] for o in observed) == ['ce-s0', 'ce_cmo-s0']
    assert all(o['variant'] == measured['runs']['variant'] and o['s_per_epoch'] > 0 for o in observed)
    # the runs are resumable train_cmo.py runs of the recipes with the fast path
    args = (tmp_path / 'work' / 'runs' / 'ce_cmo-s0' / 'args.yaml').read_text()
    assert 'data_on_device: true' in args and 'cmo: true' in args and 'epochs: 2' in args
    assert 'cuda_graph: true' in args
    assert '## Graph-safe step (--cuda-graph): graph-safe = eager' in summary
    assert measured['variants']['fp32_graph']['step_ratio'] > 0


@pytest.mark.slow
def test_failed_graph_self_check_falls_back_to_the_eager_step(tiny_data, tmp_path):
    """The graph-safe step's self-check fails (simulated): the suite goes on, its timings skipped, and the runs
    train with the eager step (no --cuda-graph) even where the graphed setting was asked for."""
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = run_suite('--device', 'cpu', '--no-install', '--epochs', '1', '--imb-max', '100', '--methods', 'ce',
                     '--seeds', '0', '--timing-epochs', '1', '--probe-parallel', '1', '--run-variant', 'fp32_graph',
                     '--simulate-graph-mismatch', '--data-dir', tiny_data, '--work', work, '--out', out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    log = (out / 'gpu_suite_log.txt').read_text()
    assert re.search(r'\] 1 graph_check: fallback in .*weights differ .*falling back to the eager step', log)
    assert re.search(r'\] 1 graph_speed: skipped .*the self-check did not pass', log)
    assert 'runs: fp32_graph without a passing self-check of the graph-safe step' in log
    assert re.search(r'\] 2 runs: done in', log)
    args = (work / 'runs' / 'ce-s0' / 'args.yaml').read_text()
    assert 'cuda_graph: false' in args and 'data_on_device: true' in args
    assert re.search(r'^\| ce-s0 \| done \| 1 \|', (out / 'gpu_suite_summary.md').read_text(), re.M)


@pytest.mark.slow
def test_tiny_budget_skips_everything_after_the_check(tiny_data, tmp_path):
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = run_suite(*DRY, '--data-dir', tiny_data, '--work', work, '--out', out, '--budget-s', '1')
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    log = (out / 'gpu_suite_log.txt').read_text()
    assert re.search(r'\] 0 check: done in', log)
    for step in ('mixing', 'speed_paths', 'probe', 'runs'):
        assert re.search(rf'\] \d {step}: skipped \(est\. \d+s\); needs ~\d+s, 0s left', log), step
    assert re.search(r'\] 3 summary: skipped .*no finished run', log)
    assert not [p for p in (work / 'runs').iterdir()]  # nothing was started
    assert not list((work / 'gpu_suite' / 'timings').glob('*.json'))
    assert returned_files(out) == ['gpu_suite.tar.gz', 'gpu_suite_log.txt', 'gpu_suite_summary.md']
    summary = (out / 'gpu_suite_summary.md').read_text()
    assert '| ce-s0 | skipped |' in summary and '| ce_cmo-s0 | skipped |' in summary


@pytest.mark.slow
def test_run_past_the_deadline_is_stopped_and_kept_for_resuming(tiny_data, tmp_path):
    """Estimates far too optimistic (a previous session's figures, say): the run starts, the deadline stops it,
    and its last checkpoint comes back in gpu_suite_resume.tar.gz."""
    wrong = tmp_path / 'measured.json'
    wrong.write_text(json.dumps(dict(proc_start_s=1., decode_s_per_image=1e-6, variants={'fp32': dict(
        s_per_image=1e-6)}, step_s={'summary': 12., 'pack': 1.})))
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = run_suite('--device', 'cpu', '--no-install', '--no-timings', '--epochs', '1000', '--imb-max', '100',
                     '--methods', 'ce', '--seeds', '0', '--data-dir', tiny_data, '--work', work, '--out', out,
                     '--estimates', wrong, '--budget-s', '50')
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    log = (out / 'gpu_suite_log.txt').read_text()
    assert 'start ce-s0' in log and 'deadline: stopping ce-s0' in log
    summary = (out / 'gpu_suite_summary.md').read_text()
    assert re.search(r'^\| ce-s0 \| incomplete \| \d+ \|', summary, re.M)
    epochs = len((work / 'runs' / 'ce-s0' / 'summary.csv').read_text().strip().splitlines()) - 1 \
        if (work / 'runs' / 'ce-s0' / 'summary.csv').is_file() else 0
    if epochs:  # the machine managed at least one epoch before the deadline: its checkpoint travels back
        assert 'gpu_suite_resume.tar.gz' in returned_files(out)
        with tarfile.open(out / 'gpu_suite_resume.tar.gz') as tf:
            assert {'ce-s0/last.pth.tar', 'ce-s0/summary.csv'} <= set(tf.getnames())
