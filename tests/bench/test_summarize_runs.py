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
        metrics=dict(top1=top1, head=top1 + 10, middle=top1, tail=top1 - 10, ece=ece),
        per_class=dict(top1=[top1 + 10, top1, top1 - 10]), class_names=NAMES,
        dataset=dict(class_counts=[100, 30, 5]), paper_top1=None, command='train_cmo.py -c x.yaml',
        resources=dict(wall_min=50.0, peak_rss_mib=1300, device='cpu'))
    (run / 'results.json').write_text(json.dumps(results))
    (run / 'args.yaml').write_text('model: resnet32_cifar\n')


def test_comparison_table_and_files(tmp_path):
    runs = tmp_path / 'runs'
    for method, top1, ece in (('ce_drw', 40., 20.), ('ce_drw_ros', 41., 22.), ('ce_drw_remix', 42., 10.),
                              ('ce_drw_cmo', 45., 12.), ('ce_drw_cmo_las', 47., 5.), ('ride', 50., 8.),
                              ('ride_cmo', 53., 7.)):
        fake_run(runs, method, 0, top1, ece)
    fake_run(runs, 'ride', 1, 52., 6.)
    out = tmp_path / 'copy'
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'summarize_runs.py'), str(runs), '--copy-to', str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert '| top-1 (ECE), mean over seeds | as is | + ROS | + Remix | + CMO | + CMO + LAS |' in text
    assert '| CE-DRW | 40.0 (20.0) | 41.0 (22.0) | 42.0 (10.0) | 45.0 (12.0) | 47.0 (5.0) |' in text
    assert '| RIDE | 51.0 (7.0) [2 seeds] | – | – | 53.0 (7.0) | – |' in text
    assert '| CE-DRW + CMO + LAS vs CE-DRW (seeds 0) | +7.0 |' in text
    assert '| RIDE + CMO vs RIDE (seeds 0) | +3.0 |' in text
    assert (out / 'table.md').read_text().strip() == text.strip()
    assert (out / 'per_class_ce_drw.png').is_file() and (out / 'per_class_ride.png').is_file()
    assert (out / 'ce_drw_cmo_las-s0' / 'results.json').is_file()
