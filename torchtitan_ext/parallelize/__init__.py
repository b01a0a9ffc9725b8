"""AliasAwareAutoParallel, torchtitan's ``parallelize_fn`` through Meta's AutoParallel: one
module per phase of a start, in the order the component runs them.

- component: the component, its Config and the call that runs the phases
- spec: what a start plans for (mesh, batch, memory bounds, plan key); pre-launch checks
- graph_cache, graph_cache_entry: warm starts (the cache and its key; what an entry holds)
- expert_parallel: the routed experts as one local_map region (expert parallelism)
- constraints: the solver's constraints
- placements: the solve, or a placement file instead of it
- compiler: apply, with the eager runner or Inductor for the graphs AutoParallel builds
- alias_check: aliases captured, restored, kept tied and verified
- report: the plan report (plan.json) and the start-up report (startup.json)
- dry_run: plan a config's model on the meta device, without training
"""

from torchtitan_ext.parallelize.component import AliasAwareAutoParallel
from torchtitan_ext.parallelize.dry_run import plan_model

__all__ = ["AliasAwareAutoParallel", "plan_model"]
