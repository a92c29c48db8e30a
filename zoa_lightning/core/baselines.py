"""Re-exports of the baseline adapters, which now live one per file in :mod:`zoa_lightning.core.methods`.

Kept so that imports of ``zoa_lightning.core.baselines`` keep working; new code imports from the method's own file.
"""

from zoa_lightning.core.methods import (
    FOA,
    T3A,
    PromptOutput,
    Tent,
    check_prompt_vit,
    foa_fitness,
    prompt_forward,
    t3a_prototypes,
    t3a_select,
    use_batch_statistics,
)

__all__ = [
    "FOA",
    "T3A",
    "PromptOutput",
    "Tent",
    "check_prompt_vit",
    "foa_fitness",
    "prompt_forward",
    "t3a_prototypes",
    "t3a_select",
    "use_batch_statistics",
]
