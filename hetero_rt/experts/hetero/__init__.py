"""The `hetero` routed-experts backend: per MoE layer, experts held by a GPU expert cache run on the
GPU beside the shared experts while the rest run on a CPU worker thread in the numba kernels.

worker.py     host buffers, the CPU job, the worker thread
session.py    what the hetero layers of one model share (worker, copier, buffers, counters)
layer.py      the layer algorithm (HeteroExperts)
expert_cache.py, prefetch.py, cost_model.py   the GPU cache and its policies, copies, the stream-or-CPU model
builder.py    building layers from a HeteroSpec; cache policies from a routing profile
"""
from .builder import build, build_layer, hetero_session, install, load_profile, make_policy
from .layer import HeteroExperts, link, rank_experts, run_pairs
from .session import HeteroSession
from .worker import CpuWorker, HostBuffers, Job

__all__ = ["build", "link", "build_layer", "hetero_session", "install", "load_profile", "make_policy", "HeteroExperts", "rank_experts",
           "run_pairs", "HeteroSession", "CpuWorker", "HostBuffers", "Job"]
