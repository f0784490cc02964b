"""What do the thoughts of a run look like, and which ones does the reward favour?

    python examples/demo/thoughts.py DUMP_DIR TOKENIZER_MODEL [--show N]

Reads the ``--rlp-dump-rollouts`` files of a run and prints, for each kind of thought — empty
(``<think></think>``), one whose first token is x_t (a "hit"), any other — how many there are,
their mean information gain (the reward), and their mean advantage; then the distinct thoughts
per group of G, and N example groups decoded.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump_dir")
    p.add_argument("tokenizer_model")
    p.add_argument("--show", type=int, default=3)
    args = p.parse_args(argv)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
    close = sp.piece_to_id("</think>")
    kinds = defaultdict(lambda: ([], []))  # kind -> (rewards, advantages)
    distinct, shown = [], 0
    for f in sorted(Path(args.dump_dir).glob("iter*_dp*.pt")):
        d = torch.load(f, weights_only=False)
        groups = defaultdict(list)
        for i, (g, thought, target) in enumerate(zip(d["groups"], d["thoughts"], d["targets"])):
            body = [t for t in thought if t != close]
            kind = "empty" if not body else ("hit (1st token = x_t)" if body[0] == target
                                            else "other")
            kinds[kind][0].append(float(d["rewards"][i]))
            kinds[kind][1].append(float(d["advantages"][i]))
            groups[g].append((tuple(body), float(d["rewards"][i]), target, d["prompts"][i]))
        for g, rows in groups.items():
            distinct.append(len({r[0] for r in rows}))
            if shown < args.show:
                shown += 1
                print(f"--- {f.name} group {g}: context …{sp.decode(list(rows[0][3][-13:-1]))!r}"
                      f" → x_t = {sp.id_to_piece(rows[0][2])!r}")
                for body, reward, _, _ in rows:
                    print(f"    <think>{sp.decode(list(body))!r}</think>  info gain {reward:+.3f}")
    n = sum(len(r) for r, _ in kinds.values())
    print(f"{'thought':<24}{'share':>8}{'info gain':>12}{'advantage':>12}")
    for kind, (rewards, adv) in sorted(kinds.items()):
        print(f"{kind:<24}{len(rewards) / n:>8.3f}{statistics.fmean(rewards):>12.4f}"
              f"{statistics.fmean(adv):>12.4f}")
    print(f"distinct thoughts per group: {statistics.fmean(distinct):.2f} ({n} thoughts, "
          f"{len(distinct)} groups)")


if __name__ == "__main__":
    main()
