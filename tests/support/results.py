"""Reading what a run logged and recomputing it outside Lightning, for tests that check the logged numbers."""

import csv
import glob
import os

import torch

from pedlightning.metrics import retrieval_evaluate


def logged_test_metrics(save_dir) -> dict[str, float]:
    """The ``test/*`` values of the one CSVLogger ``metrics.csv`` under ``save_dir``."""
    (path,) = glob.glob(os.path.join(save_dir, "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}


def text_to_image_on_test_split(model, data) -> dict[str, float]:
    """``retrieval_evaluate`` of ``model``'s caption and image features of ``data``'s test loader (part 0, part 1)."""
    batches = list(data.test_dataloader())
    queries = data.test_dataloader().dataset.parts[0]
    with torch.no_grad():
        text = torch.cat([model.encode_text(b["tokens"]) for b in batches if b["part"][0] == 0])
        images = torch.cat([model.encode_image(b["image"]) for b in batches if b["part"][0] == 1])
    return retrieval_evaluate(text, images, torch.tensor(queries.pids), torch.tensor([r.pid for r in data.source.test]))
