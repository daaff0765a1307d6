"""RetrievalTask: the query/gallery evaluation that reID and text-to-image search share, written once."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from pedlightning.errors import ConfigError
from pedlightning.metrics import TIE_RULES, RankListInputs
from pedlightning.metrics.ranking import SampleMetric
from pedlightning.tasks.base import TaskModule


class RetrievalTask(TaskModule):
    """A task evaluated by ranking a gallery for each query (reID: images; text search: captions -> images).

    Evaluation batches hold one part each: ``part`` 0 = queries, 1 = gallery (the single loader of
    :func:`pedlightning.data.eval_loader.parts_loader`; a datamodule returning ``[queries, gallery]`` as two loaders
    works too, the dataloader index then names the part). Features of every rank are gathered by the metric, which
    drops DDP padding duplicates. Each evaluation logs its metrics once (``val/*`` or ``test/*``, the
    :attr:`main_metric` on the progress bar); a test also logs ``test/chance_*``, the same evaluation on random
    features (seeded) with the same labels, and keeps the query/gallery features for
    :class:`pedlightning.callbacks.RankListCallback`. How the gallery was ranked (the metric's ``description``:
    distance, tie rule, re-ranking) is printed under the results of every test and of the first validation.

    Subclasses implement :meth:`build_metric`, :meth:`query_features`, :meth:`gallery_features` and
    :meth:`evaluate_features`, may extend :meth:`update_metric` (extra labels such as camera ids), and call
    :meth:`init_evaluation` at the end of ``__init__``.
    """

    #: names of the query and gallery parts in predict outputs and logs.
    part_names: ClassVar[tuple[str, str]] = ("query", "gallery")
    query_is_text: ClassVar[bool] = False
    eval_title: ClassVar[str] = "retrieval"
    #: the metric shown on the progress bar.
    main_metric: ClassVar[str] = "mAP"

    def init_evaluation(self, report_chance: bool = True) -> None:
        """Build the validation and test metrics; a subclass calls it once its hyper-parameters are saved."""
        ties = self.hparams.get("ties", "pessimistic")
        if ties not in TIE_RULES:
            raise ConfigError(f"{type(self).__name__}: model.init_args.ties must be one of "
                              f"{', '.join(map(repr, TIE_RULES))}, got {ties!r}")
        self.report_chance = report_chance
        self.val_metric = self.build_metric()
        self.test_metric = self.build_metric()
        self._ranklist: RankListInputs | None = None
        self._described: set[str] = set()

    # ----------------------------------------------------------------- what a subclass provides
    def build_metric(self) -> SampleMetric:
        raise NotImplementedError

    def query_features(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def gallery_features(self, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def evaluate_features(self, query_feats: Tensor, gallery_feats: Tensor, query: dict[str, Tensor],
                          gallery: dict[str, Tensor]) -> dict[str, float]:
        """The metric's evaluation of given features with the labels of ``query`` / ``gallery`` (chance baseline)."""
        raise NotImplementedError

    def update_metric(self, metric: SampleMetric, feats: Tensor, batch: dict[str, Any], is_query: bool) -> None:
        metric.update(feats, batch["pid"], is_query, batch["index"])

    def describe_evaluation(self, prefix: str) -> str:
        """Text after the metrics in the evaluation summary line (e.g. which split validation used)."""
        return ""

    # ----------------------------------------------------------------- the shared evaluation
    @staticmethod
    def batch_part(batch: dict[str, Any], dataloader_idx: int) -> int:
        return int(batch["part"][0]) if "part" in batch else dataloader_idx

    def part_features(self, batch: dict[str, Any], dataloader_idx: int = 0) -> tuple[Tensor, bool]:
        is_query = self.batch_part(batch, dataloader_idx) == 0
        feats = self.query_features(batch) if is_query else self.gallery_features(batch)
        return feats.float(), is_query

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats, is_query = self.part_features(batch, dataloader_idx)
        self._val_parts.add(is_query)
        self.update_metric(self.val_metric, feats, batch, is_query)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats, is_query = self.part_features(batch, dataloader_idx)
        self.update_metric(self.test_metric, feats, batch, is_query)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Features with their labels, split by part (:class:`pedlightning.callbacks.FeatureWriter`)."""
        feats, is_query = self.part_features(batch, dataloader_idx)
        out = {"split": self.part_names[0 if is_query else 1], "features": feats, "pid": batch["pid"],
               "index": batch["index"]}
        out.update({k: batch[k] for k in ("camid", "path") if k in batch})
        return out

    def _log_results(self, results: dict[str, float], prefix: str) -> None:
        scalars = {f"{prefix}/{k}": float(v) for k, v in results.items()}
        main = f"{prefix}/{self.main_metric}"
        # sync_dist off: the metric already holds every rank's samples
        if main in scalars:
            self.log(main, scalars.pop(main), prog_bar=True, sync_dist=False)
        self.log_dict(scalars, sync_dist=False)
        rank_zero_info(f"{self.eval_title} {prefix}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items())
                       + self.describe_evaluation(prefix))
        description = getattr(self.test_metric if prefix == "test" else self.val_metric, "description", None)
        if description and (prefix == "test" or prefix not in self._described):
            # its own line: scripts parse the results line as `k=v, k=v`
            rank_zero_info(f"{self.eval_title} {prefix} ranking: {description}")
            self._described.add(prefix)

    def on_validation_epoch_start(self) -> None:
        self._val_parts: set[bool] = set()

    def on_validation_epoch_end(self) -> None:
        if len(self._val_parts) < 2:  # e.g. limit_val_batches: 1 or overfit_batches: every rank saw the same parts
            rank_zero_warn(f"{type(self).__name__}: validation saw only "
                           f"{self.part_names[0 if True in self._val_parts else 1]} batches (limit_val_batches too "
                           "small?): no val/* metrics this time")
        else:
            self._log_results(self.val_metric.compute(), "val")
        self.val_metric.reset()

    def on_test_epoch_end(self) -> None:
        metric = self.test_metric
        results = dict(metric.compute())
        with metric.sync_context():  # every rank's samples, padding duplicates dropped, in index order
            s = {k: v.cpu() for k, v in metric.samples(key_extra="is_query").items()}
        metric.reset()
        q, g = s["is_query"], ~s["is_query"]
        query = {k: v[q] for k, v in s.items() if k not in ("features", "is_query")}
        gallery = {k: v[g] for k, v in s.items() if k not in ("features", "is_query")}
        if self.report_chance:
            rand = torch.randn(len(q), 64, generator=torch.Generator().manual_seed(0))
            chance = self.evaluate_features(rand[q], rand[g], query, gallery)
            results.update({f"chance_{k}": chance[k] for k in ("mAP", "rank1")})
        self._log_results(results, "test")
        query_items, gallery_items = self._eval_items("test")
        self._ranklist = RankListInputs(
            s["features"][q], s["features"][g], query["pids"], gallery["pids"], query.get("camids"),
            gallery.get("camids"), [query_items[i] for i in query["indices"].tolist()] if query_items else [],
            [gallery_items[i] for i in gallery["indices"].tolist()] if gallery_items else [],
            query_is_text=self.query_is_text)

    def _eval_items(self, stage: str) -> tuple[list[str], list[str]]:
        spec = self.data_spec
        items = spec.eval_items.get(stage) if spec is not None else None
        return (list(items[0]), list(items[1])) if items else ([], [])

    def ranklist_inputs(self) -> RankListInputs | None:
        """Query/gallery features and labels of the last test run, for :class:`RankListCallback`."""
        return self._ranklist
