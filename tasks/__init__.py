"""The pipeline's stages, each runnable as `python -m tasks.<stage>` without Prefect."""

import warnings

# peft asks every model for this deprecated transformers property when wrapping it; the
# warning says nothing to a user of llmft and would print in every stage's log
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
)
