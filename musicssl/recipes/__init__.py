"""Self-supervised training recipes: one file per method, one loop (`train.py`) for all of them.

A recipe is a small `nn.Module` built from its config dataclass. It owns the backbone, heads, any
EMA target and the loss, and implements:

    training_step(batch: dict[str, Tensor]) -> dict[str, Tensor]   # {"loss": scalar, other logged scalars}
    after_step(step: int, total_steps: int) -> None                 # e.g. EMA update of a target encoder
    export_encoder() -> Encoder                                     # what `musicssl export` releases
    collate(items: list[dict]) -> dict[str, Tensor]                 # data side: views, masks, shifts

`collate` runs in DataLoader workers, so views and masks are made on the data side (I-JEPA style);
the model takes them as arguments. Each dataset item is {"audio": (S,) float32, "index": int}; a
collator seeds its randomness from the items' indices so a batch is reproducible on resume and
identical whether it is built on one process or split across DDP ranks.
"""

RECIPES = {
    "simclr": "musicssl.recipes.simclr:SimCLR",
    "byol": "musicssl.recipes.byol:BYOL",
    "vicreg": "musicssl.recipes.vicreg:VICReg",
    "mae": "musicssl.recipes.mae:MAE",
    "jepa": "musicssl.recipes.jepa:JEPA",
    "pesto": "musicssl.recipes.pesto:PESTO",
}
