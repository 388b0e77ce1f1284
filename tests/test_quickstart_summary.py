"""The quickstart's closing summary names the sample files, the quick evaluation's scores and
the next commands."""
import json

from vidit import quickstart_summary


def test_summary_names_samples_scores_and_next_commands(tmp_path):
    (tmp_path / "samples").mkdir()
    for step in (1600, 4800):
        (tmp_path / "samples" / f"step_{step:07d}.gif").write_bytes(b"GIF89a")
    (tmp_path / "eval_quick").mkdir()
    (tmp_path / "eval_quick" / "eval.json").write_text(json.dumps({
        "num": 100, "guidance": 3.0, "classifier_steps": 600,
        "results": [{"steps": 50, "class_accuracy": 0.93, "frame_agreement": 0.981,
                     "class_accuracy_by_class": [1.0, 1.0, 0.8, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 0.6],
                     "top_confusions": [[9, 3, 4], [2, 5, 2], [4, 9, 1]]}]}))
    text = quickstart_summary.summary(str(tmp_path), started=None)
    assert "step_0004800.gif" in text and "step_0004800.mp4" in text
    assert "class accuracy 93%" in text and "frame agreement 98%" in text
    assert "weakest digit: 9 (60%)" in text and "9 as 3 (4), 2 as 5 (2), 4 as 9 (1)" in text
    assert "vidit.sample" in text and "vidit.export" in text and "text_digits.py" in text


def test_summary_without_samples_or_evaluation_says_so(tmp_path):
    text = quickstart_summary.summary(str(tmp_path))
    assert "no samples were written" in text and "quick evaluation" not in text


def test_the_scripts_work_under_a_python_that_refuses_pip():
    """PEP 668: a system Python with the EXTERNALLY-MANAGED marker refuses `pip install`; the
    scripts' own .venv is created from it and installs. (scripts/check_pep668.sh without
    arguments runs the whole quickstart this way: docs/quickstart.)"""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["bash", os.path.join(root, "scripts", "check_pep668.sh"), "--venv-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "refuses pip install (PEP 668): ok" in out.stdout
    assert "pip installs into it: ok" in out.stdout
