"""Evaluate GPT-2 or a training run: python run_eval.py --config <config> [--config.eval.tasks="('loss','hellaswag')"]

    python run_eval.py --config configs/shakespeare_char.py:cpu --config.init_from=resume
    python run_eval.py --config configs/gpt2.py --config.eval.tasks="('wikitext2','hellaswag')"
    python run_eval.py --config configs/gpt2.py --config.eval.tasks="('text',)" --config.eval.text_path=FILE
    python run_eval.py --config configs/gpt2.py --config.eval.tasks="('lm_eval:arc_easy,piqa',)"  # .[eval] extra

Tasks: loss (every token of a split), text (a text file), wikitext2, hellaswag, and
lm-evaluation-harness tasks (lm_eval:<task>,...; docs/evaluation.md). The table is printed
and written to eval.out (default out_dir/eval.json and eval.md). All logic is in nanogpt_jax/evaluate.py;
the eval section of configs/default.py lists the keys.
"""

from nanogpt_jax import cli, evaluate

if __name__ == "__main__":
    cli.main(evaluate.run)
