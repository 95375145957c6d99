"""Ray layer: stage workers, replicas, the coordinator, transport between stages.

Entry points: `cluster.api.generate_on_ray`, `cluster.api.RayCluster`; see docs/ARCHITECTURE.md 2.4.
"""
