"""What each block type needs beyond the shards, prepared for a run and for one stage: the
collector (llama-save), the checked NPT checkpoint (llama-npt), the sparse selections
(llama-sparse). It lives on the runner's side, so the blocks import no training code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.collector import ActivationCollector, check_collect_dir, check_disk_space, disk_estimate
from engine.config import ModelConfig
from modules.llama_sparse import SparseSettings
from modules.npt_checkpoint import CheckpointError, NPTCheckpoint
from modules.registry import NPTOptions, SaveOptions, SparseOptions, block_type
from pipeline.plan import StagePlan, recorded_layers
from pipeline.settings import RankPlace, RunSettings
from sparse_predictor.inference import load_predictors, teal_thresholds


@dataclass(frozen=True)
class RunInputs:
    """What every rank checks or loads before the process group, alike on every rank."""

    save_layers: list[int]  # the layers llama-save stages record (--collect-layers): the dataset's layers
    npt: NPTCheckpoint | None


def _runs(plan: StagePlan, options: type) -> bool:
    return block_type(plan.model_type).options is options


def prepare_run(settings: RunSettings, plans: list[StagePlan], config: ModelConfig, place: RankPlace) -> RunInputs:
    """Cheap checks every rank makes alike: the collect dir may be written (before any rank
    writes) and its disk holds this node's files, the NPT checkpoint fits the model and the stages."""
    save_types = {plan.model_type for plan in plans if _runs(plan, SaveOptions)}
    save_layers = recorded_layers(plans, save_types, settings.collect.layers)
    if save_layers:
        c = settings.collect
        if c.dir is None:
            raise ValueError("llama-save stages need --collect-dir")
        check_collect_dir(c.dir, c.resume)
        node = [layer for plan in plans if plan.rank in place.node_ranks for layer in plan.layers]
        estimate = disk_estimate(config, c.dtype, c.dir, [layer for layer in node if layer in save_layers], c.capacity)
        check_disk_space(estimate, c.ignore_disk_space, announce=place.local_rank == 0)
    return RunInputs(save_layers, load_npt_checkpoint(settings.npt_checkpoint, plans, config))


def load_npt_checkpoint(path, plans: list[StagePlan], config: ModelConfig) -> NPTCheckpoint | None:
    """The NPT checkpoint, once it is known to fit the model and every layer it converts
    to run on an NPT stage: on any other stage the layer would silently run as the original."""
    if path is None:
        if any(_runs(plan, NPTOptions) for plan in plans):
            raise ValueError("llama-npt stages need --npt-checkpoint")
        return None
    checkpoint = NPTCheckpoint.load(path)
    checkpoint.check_fits(config)
    for plan in plans:
        dropped = [layer for layer in checkpoint.config.layers if layer in plan.layers]
        if dropped and not _runs(plan, NPTOptions):
            raise CheckpointError(
                f"{checkpoint.source}: converts layers {dropped}, which stage {plan.rank} (rank {plan.rank}, layers"
                f" {plan.layers.start}-{plan.layers.stop - 1}) runs as {plan.model_type!r}, not 'llama-npt':"
                " they would run as the original layers; make that stage llama-npt (--stage-model-types)"
            )
    return checkpoint


def _save_options(settings: RunSettings, plan: StagePlan, run: RunInputs, config: ModelConfig) -> SaveOptions:
    """The collector of the stage's recorded layers; none when it records none of them."""
    c = settings.collect
    recorded = [layer for layer in plan.layers if layer in run.save_layers]
    if not recorded:
        return SaveOptions(None)
    collector = ActivationCollector(
        c.dir,
        recorded,
        run.save_layers,
        config,
        settings.model_dir,
        str(settings.infer_data),
        c.dtype,
        c.capacity,
        c.resume,
        c.flush_seconds,
    )
    return SaveOptions(collector)


def _npt_options(settings: RunSettings, plan: StagePlan, run: RunInputs, config: ModelConfig) -> NPTOptions:
    return NPTOptions(run.npt)


def _sparse_options(settings: RunSettings, plan: StagePlan, run: RunInputs, config: ModelConfig) -> SparseOptions:
    """The selection of this stage's sparse layers: predictors or TEAL thresholds, checked."""
    request, layers = settings.sparse, list(plan.layers)
    selection = SparseSettings(request.mode, request.mlp_sparsity)
    if request.mlp_sparsity > 0 and request.mode == "predictor":
        selection.predictors = load_predictors(request.predictor_dir, layers, config)
    if request.mlp_sparsity > 0 and request.mode == "teal":
        selection.thresholds = teal_thresholds(
            request.calibration_dir, settings.model_dir, config, layers, request.mlp_sparsity
        )
    return SparseOptions(selection)


#: Options class -> how one stage's options are prepared.
PREPARE: dict[type, Callable] = {SaveOptions: _save_options, NPTOptions: _npt_options, SparseOptions: _sparse_options}


def stage_options(settings: RunSettings, plan: StagePlan, run: RunInputs, config: ModelConfig):
    """This stage's block options (None for plain blocks). Nothing is written yet: the
    collector opens its files only once every rank has started."""
    kind = block_type(plan.model_type).options
    return None if kind is None else PREPARE[kind](settings, plan, run, config)
