"""The `make demo` config tests on the usual synthetic test split: 64 unseen identities, 128 queries, 400 gallery.

A better demo number must come from the recipe, never from an easier test set; this pins the test split.
"""

import os

import pytest
import yaml

from pedlightning.cli import main
from pedlightning.data.sources import Market1501
from pedlightning.data.synthetic import write_market1501

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")


def test_demo_trains_on_many_identities_and_tests_on_the_usual_unseen_split(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    data, model = resolved["data"]["init_args"], resolved["model"]["init_args"]
    assert data["synthesize"] is True and model["encoder"]["img_size"] == data["img_size"]
    source = Market1501(write_market1501(str(tmp_path / "market"), **data["synthetic"]))
    query_ids = {r.pid for r in source.query}
    gallery_ids = {r.pid for r in source.gallery}
    assert (len(source.query), len(query_ids)) == (128, 64)
    assert len(source.gallery) == 400 and gallery_ids == query_ids | {0}  # plus distractors (pid 0)
    assert source.num_train_pids == 480 and len(source.train) == 480 * 8
    train_paths = {r.path.rsplit("/", 1)[1].split("_")[0] for r in source.train}
    assert not train_paths & {f"{pid:04d}" for pid in query_ids}  # test identities are unseen in training
