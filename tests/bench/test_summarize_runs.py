"""bench/summarize_runs.py: method names, the paper's comparison layout with ECE, gains, copied files, plots."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = ['a', 'b', 'c']


def fake_run(root: Path, method: str, seed: int, top1: float, ece: float):
    run = root / f'{method}-s{seed}'
    run.mkdir(parents=True)
    results = dict(
        metrics=dict(top1=top1, head=top1 + 10, middle=top1, tail=top1 - 10, many=top1 + 5, medium=top1,
                     few=top1 - 5, ece=ece, mce=2 * ece, nll=ece / 10),
        per_class=dict(top1=[top1 + 10, top1, top1 - 10]), class_names=NAMES,
        dataset=dict(class_counts=[100, 30, 5]), paper_top1=None, command='train_cmo.py -c x.yaml',
        resources=dict(wall_min=50.0, peak_rss_mib=1300, device='cpu'))
    (run / 'results.json').write_text(json.dumps(results))
    (run / 'args.yaml').write_text('model: resnet32_cifar\n')


def test_comparison_table_and_files(tmp_path):
    runs = tmp_path / 'runs'
    for method, top1, ece in (('ce_drw', 40., 20.), ('ce_drw_ros', 41., 22.), ('ce_drw_remix', 42., 10.),
                              ('ce_drw_cmo', 45., 12.), ('ce_drw_cmo_las', 47., 5.), ('ride', 50., 8.),
                              ('ride_cmo', 53., 7.), ('ride_cmo_router', 52., 6.)):
        fake_run(runs, method, 0, top1, ece)
    fake_run(runs, 'ride', 1, 52., 6.)
    fake_run(runs, 'ride_cmo', 1, 51., 9.)  # below RIDE at seed 1: the per-seed gains show the flip
    out = tmp_path / 'copy'
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(runs), '--copy-to', str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert '| top-1 (ECE), mean over seeds | as is | + ROS | + Remix | + CMO | + CMO + LAS | + CMO + EA |' in text
    assert '| CE-DRW | 40.0 (20.0) | 41.0 (22.0) | 42.0 (10.0) | 45.0 (12.0) | 47.0 (5.0) | – |' in text
    assert '| RIDE | 51.0 (7.0) [seeds: 50.0, 52.0] | – | – | 52.0 (8.0) [seeds: 53.0, 51.0] | – | 52.0 (6.0) |' in text
    # per run: top-1, head, middle, tail, ECE, MCE, NLL, per class, paper
    assert '| CE-DRW + CMO | 0 | 45.0 | 55.0 | 45.0 | 35.0 | 12.0 | 24.0 | 1.20 | 55.0 | 45.0 | 35.0 | – |' in text
    assert '| **RIDE** | mean of 2 | **51.0** | 61.0 | 51.0 | 41.0 | 7.0 | 14.0 | 0.70 | 61.0 | 51.0 | 41.0 | |' in text
    # gains: top-1, head, middle, tail, many, medium, few, then the top-1 gain of each seed
    assert '| RIDE + CMO + EA vs RIDE (seeds 0) | +2.0 | +2.0 | +2.0 | +2.0 | +2.0 | +2.0 | +2.0 | +2.0 |' in text
    assert '| CE-DRW + CMO + LAS vs CE-DRW (seeds 0) | +7.0 |' in text
    assert '| RIDE + CMO vs RIDE (seeds 0, 1) | +1.0 | +1.0 | +1.0 | +1.0 | +1.0 | +1.0 | +1.0 | +3.0, -1.0 |' in text
    assert (out / 'table.md').read_text().strip() == text.strip()
    assert (out / 'per_class_ce_drw.png').is_file() and (out / 'per_class_ride.png').is_file()
    assert (out / 'ce_drw_cmo_las-s0' / 'results.json').is_file()
    (runs / 'ride-s0' / 'reliability.svg').write_text('<svg/>')  # a run drawn with --plot-format svg
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(runs), '--copy-to',
                           str(tmp_path / 'svg'), '--plot-format', 'svg'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / 'svg' / 'per_class_ride.svg').read_bytes().startswith(b'<?xml')
    assert (tmp_path / 'svg' / 'ride-s0' / 'reliability.svg').is_file()


def test_resumed_run_time_is_summed_over_epochs(tmp_path):
    """A resumed run's results.json times only the last part; the table sums summary.csv's epoch times instead,
    counting an epoch repeated after a kill once (its last row)."""
    runs = tmp_path / 'runs'
    fake_run(runs, 'ce', 0, 40., 20.)
    fake_run(runs, 'ce_cmo', 0, 41., 18.)
    for method in ('ce', 'ce_cmo'):
        results = json.loads((runs / f'{method}-s0' / 'results.json').read_text())
        results['command'] = 'train_cmo.py -c x.yaml --resume last.pth.tar'
        (runs / f'{method}-s0' / 'results.json').write_text(json.dumps(results))
    # epochs 0-2, killed during epoch 2 after its row was written, resumed at 2: 60 + 90 + 30 s
    (runs / 'ce-s0' / 'summary.csv').write_text(
        'epoch,train_loss,lr,epoch_time_s,eval_top1\n0,2.3,0.1,60.0,\n1,2.0,0.1,90.0,30.0\n2,1.9,0.1,45.0,\n'
        '2,1.9,0.1,30.0,40.0\n')
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(runs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '| ce-s0 | 3.0 (resumed: epoch times summed) | 1,300 | cpu |' in proc.stdout
    # no summary.csv: results.json's figure, marked as the last part only
    assert '| ce_cmo-s0 | 50.0 (after resume: last part only) | 1,300 | cpu |' in proc.stdout


def test_decoupling_and_post_hoc_names(tmp_path):
    """cRT / LWS runs and the --evaluate --post-hoc folders of a run are variants of their base method."""
    sys.path.insert(0, str(REPO / 'bench'))
    import summarize_runs
    assert summarize_runs.split('ce_cmo_crt') == ('ce', '_cmo_crt') and summarize_runs.split('bs_lws') == ('bs', '_lws')
    assert summarize_runs.label('ce_cmo_tau_norm') == 'CE + CMO + tau-norm'
    assert summarize_runs.label('ce_post_la') == 'CE + post-hoc LA'
    runs = tmp_path / 'runs'
    fake_run(runs, 'ce', 0, 40., 20.)
    fake_run(runs, 'ce_crt', 0, 44., 10.)
    results = json.loads((runs / 'ce_crt-s0' / 'results.json').read_text())
    results['command'] = 'train_cmo.py --evaluate --resume ce-s0/last.pth.tar --post-hoc tau_norm'
    (runs / 'ce_crt-s0' / 'results.json').write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(runs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '| top-1 (ECE), mean over seeds | as is | + cRT |' in proc.stdout
    assert '| CE | 40.0 (20.0) | 44.0 (10.0) |' in proc.stdout
    assert '| ce_crt-s0 | 50.0 (evaluation) |' in proc.stdout


def test_lade_and_ib_rows_are_named():
    sys.path.insert(0, str(REPO / 'bench'))
    import summarize_runs
    assert summarize_runs.label('lade') == 'LADE' and summarize_runs.label('ib_cmo') == 'IB + CMO'
    # the comparison methods follow the paper's own losses in the table
    order = sorted(['ib_cmo', 'lade', 'ce', 'ib', 'ride_cmo'], key=summarize_runs.order_key)
    assert order == ['ce', 'ride_cmo', 'lade', 'ib', 'ib_cmo']
