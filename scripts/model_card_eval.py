"""Writes the Evaluation section of the embedded model's card (tta/default_model/README.md)
from run directories made by scripts/reproduce_reports.sh; every number comes from those runs."""
import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

from tta.pretrain import write_model_card
from tta.report import accuracy_table, load_runs

RUNS = [  # (what, run directory)
    ("gen-eval, all 200 tasks", "runs/card/icl-gen-eval"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/icl-f2e12-seed0"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/ttt_lora-f2e12-seed0"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/less-f2e12-seed0"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/sampling-f2e12-seed0"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/copy_input-f2e12-seed0"),
    ("gen-eval, 20 tasks (`sample = 20`)", "runs/default/common_output-f2e12-seed0"),
    ("arc1-heldout (unseen arc1-train), first 10", "runs/card/icl-arc1-heldout"),
    ("arc1-heldout (unseen arc1-train), first 10", "runs/card/ttt-arc1-heldout"),
    ("arc1-heldout (unseen arc1-train), first 10", "runs/card/copy-arc1-heldout"),
    ("arc1-eval, first 5", "runs/icl"),
    ("arc1-eval, first 5", "runs/ttt"),
]


def fmt(x, digits=3):
    return "-" if x != x else f"{x:.{digits}f}"


def main():
    rows = ["| data | method | budget (FLOPs/task) | tasks | exact, all outputs (95% Wilson) | attempt-1 cell acc | true-answer NLL | token acc | FLOPs/task | s/task | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for what, path in RUNS:
        if not Path(path, "results.jsonl").exists():
            print(f"skipping {path}: not run", file=sys.stderr)
            continue
        manifest = json.loads(Path(path, "manifest.json").read_text())
        acc = accuracy_table(load_runs([path])).iloc[0]
        budget = manifest["budget"]["flops"]
        rows.append(f"| {what} | {manifest['method']} | {'%.0e' % budget if budget else 'none'} | {acc['n_tasks']} | "
                    f"{acc['n_solved_tasks']}/{acc['n_tasks']} [{100 * acc['all_outputs_lo']:.0f}%, {100 * acc['all_outputs_hi']:.0f}%] | "
                    f"{fmt(acc['cell_acc'])} | {fmt(acc['nll'])} | {fmt(acc['token_acc'])} | "
                    f"{acc['flops_mean']:.2e} | {acc['seconds_mean']:.1f} | `{manifest['command']}` |")
    text = ("Measured on a 2-core CPU; each row is one run directory, made by the command shown "
            "(all of them: `scripts/reproduce_reports.sh`). Seconds were measured while other jobs shared the CPU and overstate the cost; FLOPs do not depend on that. Exact = every test output right in one of two "
            "attempts; graded metrics as in `tta compare`.\n\n" + "\n".join(rows) + "\n\n"
            "The model solves none of these tasks exactly, and no attempt of a model method has the right "
            "shape (greedy decoding fixes a wrong row width, then runs to the length limit), while copying "
            "the test input gets the shape right on many generated tasks. It is a weak base: the in-context "
            "target for gen-eval (10-60% exact) is not met. More pretraining compute (a GPU run of "
            "`tta pretrain`) is the way to a useful base model.\n")
    out = Path("tta/default_model")
    (out / "evaluation.md").write_text(text)
    state = json.loads((out / "trainer_state.json").read_text())
    write_model_card(out, state, AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), "")
    print(text)


if __name__ == "__main__":
    main()
