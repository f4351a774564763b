r"""What each device holds to serve a Qwen2.5 model, and the KV page pool the rest holds: the memory planner
(`qwenjax.engine.planner`) and the topology files (`qwenjax.engine.topologies`) on the command line.

    python -m launch.plan --topology=v5e-8
    python -m launch.plan --model=qwen2.5-72b --mesh=tensor:8 --max_batch_size=32 --max_seq_len=16384 \
        --memory_gib=32 --kv_cache_dtype=int8
    python -m launch.plan --readme               # the tables of tpu_configs/README.md
    python -m launch.plan --derive_topologies    # rewrites tpu_configs/*.json's derived fields
"""

from __future__ import annotations

import functools

from absl import app, flags, logging

from qwenjax._errors import ConfigError
from qwenjax.config import DTYPES
from qwenjax.engine.planner import DEFAULT_PAGE_SIZE, format_table, plan_memory
from qwenjax.engine.topologies import derive_topologies, load_topology, plan_topology, readme_tables


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The entry point's flags, defined only when run as a program (other launch/ scripts define --model too)."""
  return dict(
      topology=flags.DEFINE_string("topology", None, "A topology name (tpu_configs/NAME.json) or a JSON file: "
                                   "plans every model it serves and says whether each fits."),
      model=flags.DEFINE_string("model", None, "A preset name (qwen2.5-7b, qwen2.5-vl-7b, ...) to plan alone."),
      mesh=flags.DEFINE_string("mesh", "", "With --model: mesh axes, e.g. 'data:2,tensor:4'."),
      dtype=flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "With --model: compute and weight "
                              "dtype."),
      max_batch_size=flags.DEFINE_integer("max_batch_size", 8, "With --model: decode slots.", lower_bound=1),
      max_seq_len=flags.DEFINE_integer("max_seq_len", 4096, "With --model: longest sequence.", lower_bound=1),
      max_prefill_chunk=flags.DEFINE_integer("max_prefill_chunk", 512, "With --model: tokens of one prefill call.",
                                             lower_bound=1),
      page_size=flags.DEFINE_integer("page_size", DEFAULT_PAGE_SIZE, "With --model: tokens per KV page.",
                                     lower_bound=1),
      kv_cache_dtype=flags.DEFINE_enum("kv_cache_dtype", None, ["int8"], "KV pages in int8 with float32 scales "
                                       "(default: the compute dtype); with --topology, the files' GiB of int8 "
                                       "pages."),
      kv_cache_memory_gib=flags.DEFINE_float("kv_cache_memory_gib", None, "With --model: GiB of KV pages per "
                                             "device (default: what --memory_gib leaves, or every slot at "
                                             "--max_seq_len)."),
      memory_gib=flags.DEFINE_float("memory_gib", None, "With --model: memory per device, to size the page pool "
                                    "from and say whether the plan fits."),
      margin=flags.DEFINE_float("margin", 0.1, "With --model and --memory_gib: fraction of memory kept free."),
      quantize=flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "With --model: int8 projections "
                                 "with float32 scales per output channel, as `qwenjax.load(quantize=...)`."),
      readme=flags.DEFINE_bool("readme", False, "Print the tables of tpu_configs/README.md."),
      derive_topologies=flags.DEFINE_bool("derive_topologies", False, "Rewrite every tpu_configs/*.json (or "
                                          "--topology alone) with the page_size and kv_cache_memory_gib the "
                                          "planner derives."),
  )


def main(argv, f: dict[str, flags.FlagHolder]):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if f["derive_topologies"].value:
      names = [f["topology"].value] if f["topology"].value else None
      changed = derive_topologies(names)
      logging.info("rewrote %d topology files: %s", len(changed), ", ".join(map(str, changed)) or "none")
      print("\n".join(map(str, changed)))
    elif f["readme"].value:
      print(readme_tables())
    elif f["topology"].value:
      topo = load_topology(f["topology"].value)
      print(f"{topo.name}: {topo.chips} x {topo.accelerator}, {topo.memory_per_chip_gib:g} GiB each, "
            f"{topo.dtype}")
      plans = plan_topology(topo, kv_cache_dtype=f["kv_cache_dtype"].value)
      print(format_table(plans, topo.memory_per_chip_gib, topo.margin))
    elif f["model"].value:
      memory = f["memory_gib"].value
      margin = f["margin"].value if memory else 0.0
      plan = plan_memory(f["model"].value, mesh=f["mesh"].value, dtype=f["dtype"].value,
                         max_batch_size=f["max_batch_size"].value, max_seq_len=f["max_seq_len"].value,
                         max_prefill_chunk=f["max_prefill_chunk"].value, page_size=f["page_size"].value,
                         kv_cache_dtype=f["kv_cache_dtype"].value, kv_cache_memory=f["kv_cache_memory_gib"].value,
                         memory_gib=memory, margin=margin, quantize=f["quantize"].value)
      print(format_table([plan], memory, margin))
    else:
      raise app.UsageError("give --topology, --model, --readme or --derive_topologies.")
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(functools.partial(main, f=_flags))
