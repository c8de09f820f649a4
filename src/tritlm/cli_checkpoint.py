"""``tritlm checkpoint-convert``: a sharded (FSDP) training checkpoint into a single-folder one."""

from __future__ import annotations

import argparse


def cmd_checkpoint_convert(a: argparse.Namespace) -> int:
    from tritlm.formats.sharded import convert_sharded

    out = convert_sharded(a.src, a.dst)
    print(f"wrote {out} (single-folder checkpoint: tritlm pack / generate / eval read it)")
    return 0


def add_checkpoint_commands(sub) -> None:
    s = sub.add_parser("checkpoint-convert",
                       help="turn a sharded checkpoint of an FSDP run (`train --fsdp`) into a single-folder one")
    s.add_argument("src", help="a sharded step-* checkpoint folder, or a run folder (its latest checkpoint)")
    s.add_argument("dst", help="the checkpoint folder to write (must not exist)")
    s.set_defaults(fn=cmd_checkpoint_convert)
