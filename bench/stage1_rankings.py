"""Stage-1 diagnostics: does the NWC reinitialization reach the backdoor?

For one cached quality-benchmark model (``bench.quality`` trains and caches
them), run clean unlearning once per unlearning learning rate, then zero the
original weights for several n under three neuron scores and print accuracy on
D and ASR right after the reinitialization, before any fine-tuning:

* ``sum``  - the TSBD score: L1 of the weight change of the output channel;
* ``mean`` - that sum divided by the channel's fan-in (``in * kh * kw``), so
  early layers with few weights per channel can compete;
* ``rel``  - that sum divided by the mean score of its layer.

Only ``sum`` is what the engine does; the other two are here to test whether
the ranking's bias toward wide late layers is what hides a backdoor. Also
printed: the layers of the top 5% of neurons, and where the unlearned model
sends the clean images (a backdoored model tends to send them to the target).

    .venv/bin/python -m bench.stage1_rankings --arch small_cnn --attack Blended --epochs 15 --lr 0.05
    .venv/bin/python -m bench.stage1_rankings --arch preact_resnet18 --attack Blended --epochs 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from bench.common import mnist_split
from bench.quality import ATTACKS, EXTRA_ATTACKS, TRAIN_CONFIG, attack_trigger, get_model, model_spec
from defense_core.attacks import make_poisoned_test_set
from defense_core.jobs.params import PurifyConfig
from defense_core.metrics import evaluate, predict
from defense_core.transforms import Normalizer
from defense_core.tsbd.nwc import NeuronRanking, rank_neurons
from defense_core.tsbd.reinit import zero_reinit_
from defense_core.tsbd.unlearning import unlearn_

SCORES = ("sum", "mean", "rel")


def rescore(ranking: NeuronRanking, score: str) -> NeuronRanking:
    """The same neurons and weight changes, ranked by another per-neuron score."""
    if score == "sum":
        return ranking
    per_layer = []
    for change in ranking.weight_changes:
        s = change.flatten(1).sum(dim=1).to(torch.float64)
        per_layer.append(s / change[0].numel() if score == "mean" else s / s.mean())
    scores = torch.cat(per_layer)
    layer_index = torch.cat([torch.full((len(s),), i, dtype=torch.int64) for i, s in enumerate(per_layer)])
    channel = torch.cat([torch.arange(len(s)) for s in per_layer])
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    return NeuronRanking(ranking.layers, ranking.weight_changes, layer_index[order], channel[order], sorted_scores)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="preact_resnet18")
    parser.add_argument("--attack", default="Blended", choices=[*(a for a, t in ATTACKS.items() if t), *EXTRA_ATTACKS])
    parser.add_argument("--epochs", type=int, default=TRAIN_CONFIG.epochs, help="training epochs of the cached model")
    parser.add_argument("--lr", type=float, default=TRAIN_CONFIG.lr, help="training lr of the cached model")
    parser.add_argument("--unlearn-lrs", default="0.0001", help="comma-separated unlearning learning rates")
    parser.add_argument("--n-values", default="0.01,0.05,0.1,0.2,0.3")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = model_spec(args.arch)
    split = mnist_split()
    train_config = dataclasses.replace(TRAIN_CONFIG, epochs=args.epochs, lr=args.lr)
    trained = get_model(args.attack, attack_trigger(args.attack), spec=spec, split=split, config=train_config,
                        seed=0, retrain=False)
    model = trained.model
    assert trained.trigger is not None
    poisoned = make_poisoned_test_set(split.test, trained.trigger)
    before = evaluate(model, spec, test=split.test, poisoned=poisoned)
    print(f"{args.arch} / {args.attack}: CA {100 * before.ca:.1f}, ASR {100 * before.asr:.1f} "
          f"({'cached' if trained.from_cache else 'trained now'})", flush=True)
    config = PurifyConfig()
    n_values = [float(v) for v in args.n_values.split(",")]
    print("| unlearn lr | score | top-5% neurons by layer | " + " | ".join(f"n={n:g}" for n in n_values) + " |")
    print("|---|---|---|" + "---|" * len(n_values), flush=True)
    for lr in (float(v) for v in args.unlearn_lrs.split(",")):
        unlearned = copy.deepcopy(model)
        started = time.perf_counter()
        result = unlearn_(unlearned, split.clean, spec=spec, config=dataclasses.replace(config.unlearn, lr=lr),
                          augment=config.augment, batch_size=config.batch_size,
                          generator=torch.Generator().manual_seed(config.seed))
        pred = predict(unlearned, split.clean.x, normalizer=Normalizer(spec, torch.device("cpu")))
        hist = torch.bincount(pred, minlength=spec.num_classes).tolist()
        print(f"unlearning lr {lr:g}: {result.steps} steps, accuracy on D {100 * result.final_clean_acc:.1f}%, "
              f"{time.perf_counter() - started:.0f} s; predictions on D by class: {hist}", flush=True)
        base = rank_neurons(model, unlearned)
        del unlearned
        for score in SCORES:
            ranking = rescore(base, score)
            top = ranking.layer_index[: max(1, len(ranking) // 20)]
            counts = torch.bincount(top, minlength=len(ranking.layers)).tolist()
            where = ", ".join(f"{ranking.layers[i]} {c}" for i, c in enumerate(counts) if c)
            cells = []
            for n in n_values:
                candidate = copy.deepcopy(model)
                zero_reinit_(candidate, ranking, dataclasses.replace(config.reinit, neuron_ratio=n))
                m = evaluate(candidate, spec, test=split.clean, poisoned=poisoned)
                cells.append(f"{100 * m.ca:.0f} / {100 * m.asr:.0f}")
            print(f"| {lr:g} | {score} | {where} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
