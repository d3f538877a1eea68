"""Writes the Evaluation section of the embedded model's card (tta/default_model/README.md)
from run directories made by scripts/reproduce_reports.sh; every number comes from those runs."""
import dataclasses
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from tta.model.loading import quiet_transformers
from tta.training.pretrain import write_model_card
from tta.reporting.report import accuracy_table, load_runs

RUNS = [  # (what, run directory)
    ("gen-eval, 50 tasks (`--sample 50`)", "reports/runs/card/icl-gen-eval-50"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/icl-f5e11-seed0"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/ttt_lora-f5e11-seed0"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/less-f5e11-seed0"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/sampling-f5e11-seed0"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/copy_input-f5e11-seed0"),
    ("gen-eval, 40 tasks (`sample = 40`)", "reports/runs/default/common_output-f5e11-seed0"),
    ("arc1-heldout (unseen arc1-train), first 10", "reports/runs/card/icl-arc1-heldout"),
    ("arc1-heldout (unseen arc1-train), first 10", "reports/runs/card/ttt-arc1-heldout"),
    ("arc1-heldout (unseen arc1-train), first 10", "reports/runs/card/copy-arc1-heldout"),
    ("arc1-eval, 40 tasks (`--sample 40`)", "reports/runs/card/icl-arc1-eval-40"),
    ("arc1-eval, 40 tasks (`--sample 40`)", "reports/runs/card/ttt-arc1-eval-40"),
    ("arc1-eval, first 5", "reports/runs/icl"),
    ("arc1-eval, first 5", "reports/runs/ttt"),
]


def method_label(manifest: dict) -> str:
    """The method, with the settings where the run differs from the method's defaults today
    (a default changed since the run, e.g. ttt_lora's learning rate): its command alone would
    no longer reproduce it."""
    from tta.method import get_method, make_config
    defaults = dataclasses.asdict(make_config(get_method(manifest["method"]), []))
    changed = {k: v for k, v in manifest["config"].items() if k in defaults and defaults[k] != v}
    return manifest["method"] + "".join(f" (`{k}={v}`)" for k, v in sorted(changed.items()))


def fmt(x, digits=3):
    return "-" if x != x else f"{x:.{digits}f}"


def main():
    quiet_transformers()
    from tta.method import discover
    discover()   # the built-in methods, for the rows' defaults
    rows = ["| data | method | budget (FLOPs/task) | tasks | exact, all outputs (95% Wilson) | attempt-1 right shape | attempt-1 cell acc | true-answer NLL | token acc | FLOPs/task | s/task | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    headline = None
    for what, path in RUNS:
        if not Path(path, "results.jsonl").exists():
            print(f"skipping {path}: not run", file=sys.stderr)
            continue
        manifest = json.loads(Path(path, "manifest.json").read_text())
        acc = accuracy_table(load_runs([path])).iloc[0]
        budget = manifest["budget"]["flops"]
        rows.append(f"| {what} | {method_label(manifest)} | {'%.0e' % budget if budget else 'none'} | {acc['n_tasks']} | "
                    f"{acc['n_solved_tasks']}/{acc['n_tasks']} [{100 * acc['all_outputs_lo']:.1f}%, {100 * acc['all_outputs_hi']:.1f}%] | "
                    f"{fmt(acc['shape_ok'], 2)} | {fmt(acc['cell_acc'])} | {fmt(acc['nll'])} | {fmt(acc['token_acc'])} | "
                    f"{acc['flops_mean']:.2e} | {acc['seconds_mean']:.1f} | `{manifest['command']}` |")
        if headline is None and manifest["dataset"] == "gen-eval" and manifest["method"] == "icl":
            headline = acc
    text = ("Measured on a 2-core CPU; each row is one run directory, made by the command shown "
            "(all of them: `scripts/reproduce_reports.sh`; two jobs side by side, each pinned to one core with one thread, so seconds are one core's). Exact = every test output right in "
            "one of two attempts; graded metrics as in `tta compare` (cell accuracy is 0 for a wrong shape; "
            "NLL and token accuracy are the true answer's, teacher-forced, per token). A method shown with "
            "settings ran with those values where today's defaults differ (add them as `--set` to its command).\n\n" + "\n".join(rows) + "\n")
    if headline is not None:
        met = 0.10 <= headline["all_outputs"] <= 0.60
        text += (f"\nIn-context exact accuracy on gen-eval: {headline['n_solved_tasks']}/{headline['n_tasks']} = "
                 f"{100 * headline['all_outputs']:.1f}% (95% Wilson {100 * headline['all_outputs_lo']:.1f}-"
                 f"{100 * headline['all_outputs_hi']:.1f}%); the aim of 10-60% is {'met' if met else 'not met'}.\n")
    out = Path("tta/default_model")
    (out / "evaluation.md").write_text(text)
    state = json.loads((out / "trainer_state.json").read_text())
    write_model_card(out, state, AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), "")
    print(text)

if __name__ == "__main__":
    main()
