"""Fitting the LESS feature maps φ/ψ of a frozen model (`less-cuda train`, or `python -m less_cuda train`;
`torchrun --nproc_per_node N -m less_cuda train ...` runs it over N processes), in up to two stages:

- "layer" (`layer_stage`): each full-attention layer alone, teacher-forced on the unmodified model's hidden
  states, by the MSE of its attention output. The layers are sharded over the processes.
- "end-to-end" (`end_to_end`): all layers together, by the KL divergence of the next-token distribution from
  the full cache's, with every layer compressed. It starts from the layer stage's maps, or from the checkpoint
  `init` when it runs alone. Data parallel over the processes.

Outputs: `<output>/config.json` + `kernels.safetensors` (`FeatureMaps.save_pretrained`) and `report.json`: the
layer stage's per-layer validation MSE (sparse policy alone, Baseline+, LESS), the end-to-end stage's validation KL
and held-out perplexities before and after it, time and memory. Progress for resuming lives in `<output>/progress`
until the run completes: rerunning the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..core.feature_maps import FeatureMaps, FeatureMapsConfig
from ..eval.comparison import gap_closed
from ..eval.perplexity import compare
from ..hf.data import tokenizer_splits
from ..hf.models import DTYPES, full_attention_layers, load_model, model_layout
from .capture import capture
from .config import TrainConfig
from .distributed import init_distributed, share_layer_results
from .end_to_end import EndToEndTrainer
from .input_scaling import input_rms
from .layer_stage import report, train_layer

PROGRESS_DIR = "progress"


def provenance(cfg: TrainConfig) -> dict:
    """How a checkpoint was trained, for its config.json: the run's settings with the data file's and the initial
    checkpoint's names (not local paths) and the budget in tokens."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "output"}
    settings["data"] = Path(cfg.data).name if Path(cfg.data).is_file() else cfg.data
    settings["init"] = Path(cfg.init).name if cfg.init else None
    return {**settings, "budget_tokens": cfg.resolved_policy().budget}


def fitted_policy(cfg: TrainConfig) -> dict:
    """The policy a checkpoint records: what the fitting ran. Not the prefill ranking: fitting streams every token
    through the decode rule and never prefills (so checkpoints stay readable by releases without those fields)."""
    return {k: v for k, v in asdict(cfg.policy_spec()).items() if not k.startswith("prefill_")}


def _check_progress(progress_dir: Path, cfg: TrainConfig) -> None:
    """Resume only a run with the same configuration: a stale progress directory would silently mix two runs."""
    record = progress_dir / "train_config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if record.is_file() and record.read_text() != wanted:
        raise ValueError(f"{progress_dir} holds progress of a run with another configuration ({record}); "
                         "use another output directory or delete it")
    record.write_text(wanted)


def _layer_stage(cfg: TrainConfig, model, kcfg: FeatureMapsConfig, splits, progress_dir: Path, rank: int,
                 world: int, device: torch.device) -> tuple[FeatureMaps, dict]:
    """The per-layer stage: layer i is trained by rank i mod world, then every process gets every layer."""
    layers = kcfg.layers
    mine = [layer for i, layer in enumerate(layers) if i % world == rank]
    todo = [layer for layer in mine if not (progress_dir / f"layer_{layer}.safetensors").is_file()]
    train_caps, val_caps = {}, {}
    if todo:
        train_caps = capture(model, splits.train[: cfg.sequences], todo, cfg.batch_size, "capture train")
        val_caps = capture(model, splits.validation[: cfg.val_sequences], todo, cfg.batch_size, "capture val")
    results = {}
    for layer in tqdm(mine, desc=f"rank {rank} layers", position=0, unit="layer", disable=world > 1 and rank > 0):
        results[layer] = train_layer(cfg, kcfg, layer, train_caps.pop(layer, None), val_caps.pop(layer, None),
                                     progress_dir, device, position=1)
    feature_maps = FeatureMaps(kcfg)
    share_layer_results(results, layers, world, feature_maps.layer(layers[0]))
    feature_maps.load_state_dict({f"layers.{i}.{k}": v for i, r in results.items() for k, v in r.state.items()})
    if rank == 0:
        print(report(results))
    return feature_maps.to(device), {str(layer): results[layer].mse for layer in sorted(results)}


def _initial_maps(cfg: TrainConfig, model, kcfg: FeatureMapsConfig, device: torch.device) -> FeatureMaps:
    """The checkpoint an end-to-end stage run alone starts from, checked against the model, policy kind and rank;
    it is refitted for this run's policy (budget included) and keeps its own provenance under `init_training`."""
    init = Path(cfg.init or cfg.output)
    loaded = FeatureMaps.from_pretrained(init)
    loaded.check_compatible(model_layout(model.config), cfg.policy, cfg.rank)
    config = replace(loaded.config, policy=kcfg.policy, training={**kcfg.training,
                                                                  "init_training": loaded.config.training})
    feature_maps = FeatureMaps(config)
    feature_maps.load_state_dict(loaded.state_dict())
    return feature_maps.to(device)


def _end_to_end_stage(cfg: TrainConfig, model, feature_maps: FeatureMaps, splits, progress_dir: Path, rank: int,
                      world: int) -> dict:
    """The end-to-end stage on `feature_maps` (updated in place to its best weights); returns its report, with the
    held-out perplexities before and after in the parallel evaluation form (`less-cuda eval`'s default)."""
    if cfg.batch_size % world:
        raise ValueError(f"the end-to-end stage splits each batch over the processes: batch_size {cfg.batch_size} "
                         f"must be a multiple of the {world} processes")
    train_seqs, val_seqs = splits.train[: cfg.sequences], splits.validation[: cfg.val_sequences]
    if len(train_seqs) < cfg.batch_size:
        raise ValueError(f"the end-to-end stage needs at least one batch: {len(train_seqs)} training sequences "
                         f"for batch_size {cfg.batch_size}")
    if rank == 0:
        before = compare(model, val_seqs, cfg.policy_spec(), feature_maps, cfg.batch_size).perplexity
    scales = None
    if cfg.input_scaling == "rms":  # the scale of each layer's queries and keys, from the first training batch
        captured = capture(model, train_seqs[: cfg.batch_size], feature_maps.config.layers, cfg.batch_size,
                           "input scale")
        scales = {layer: (input_rms(c.q), input_rms(c.k)) for layer, c in captured.items()}
    trainer = EndToEndTrainer(cfg, model, feature_maps, progress_dir, rank, world, scales)
    trainer.fit(train_seqs, val_seqs)
    result = {"validation_kl_before": trainer.initial_val, "validation_kl_best": trainer.best_val,
              "timing": trainer.timing()}
    if rank == 0:
        after = {**before, "less": compare(model, val_seqs, cfg.policy_spec(), feature_maps, cfg.batch_size,
                                           ("less",)).perplexity["less"]}
        result |= {"validation_sequences": len(val_seqs), "perplexity_before": before, "perplexity_after": after}
        for name, ppl in (("before", before), ("after", after)):
            closed = gap_closed(ppl, "baseline_plus")
            print(f"end-to-end stage, {name}: LESS perplexity {ppl['less']:.3f} (full {ppl['full']:.3f}, "
                  f"Baseline+ {ppl['baseline_plus']:.3f}); closes {100 * closed:.1f}% of the Baseline+ gap")
        if result["timing"]:
            print(f"end-to-end stage: {result['timing']['seconds_per_step']:.1f} s per step, peak memory "
                  f"{result['timing']['peak_memory_gib']:.1f} GiB")
    return result


def train(cfg: TrainConfig) -> FeatureMaps:
    """Run `cfg.stages` for `cfg.model` and write the checkpoint to `cfg.output`. Returns the feature maps (on every
    process)."""
    rank, world, device = init_distributed()
    started = time.time()
    model, tokenizer = load_model(cfg.model, DTYPES[cfg.dtype], cfg.gguf_file)
    model.to(device)
    layout = model_layout(model.config)
    kcfg = FeatureMapsConfig(
        base_model=str(model.config.name_or_path), **layout,
        layers=cfg.layers if cfg.layers is not None else full_attention_layers(model.config),
        policy=fitted_policy(cfg), rank=cfg.rank, kernel_hidden=cfg.hidden or layout["head_dim"],
        training=provenance(cfg),
    )
    output = Path(cfg.output)
    progress_dir = output / PROGRESS_DIR
    if "layer" not in cfg.stages:  # before anything is written into `output`, which may be the initial checkpoint
        feature_maps = _initial_maps(cfg, model, kcfg, device)
    if rank == 0:
        progress_dir.mkdir(parents=True, exist_ok=True)
        _check_progress(progress_dir, cfg)
    if world > 1:
        dist.barrier()

    splits = tokenizer_splits(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction)
    if len(splits.train) == 0 or len(splits.validation) == 0:
        raise ValueError(f"{cfg.data!r} is too short for one {cfg.seq_len}-token sequence in both splits "
                         f"(train {len(splits.train)}, validation {len(splits.validation)})")
    summary: dict = {"processes": world, "stages": list(cfg.stages)}
    if "layer" in cfg.stages:
        feature_maps, summary["validation_mse"] = _layer_stage(cfg, model, kcfg, splits, progress_dir, rank, world,
                                                               device)
    if "end-to-end" in cfg.stages:
        summary["end_to_end"] = _end_to_end_stage(cfg, model, feature_maps, splits, progress_dir, rank, world)
    if rank == 0:
        feature_maps.save_pretrained(output)
        shutil.rmtree(progress_dir)  # only needed to resume an unfinished run
        summary["seconds"] = round(time.time() - started, 1)
        (output / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"checkpoint written to {output} in {summary['seconds']:.0f} s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return feature_maps
