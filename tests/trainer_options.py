"""The TRL config options the trainer tests share: a few optimizer steps on CPU, logged at each step, nothing
saved or reported. Each test module passes its own output directory and what it changes."""

from __future__ import annotations


def cpu_options(output_dir: str, /, *, groups: bool = True, **overrides) -> dict:
    """Keyword arguments for a TRL config (GRPO / RLOO with `groups`: 8 rows in groups of 4, completions
    not logged; distillation without), updated by `overrides` (an `output_dir` among them replaces the
    module's default directory)."""
    options = dict(
        output_dir=output_dir,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        seed=7,
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    if groups:
        options.update(per_device_train_batch_size=8, num_generations=4, log_completions=False)
    options.update(overrides)
    return options
