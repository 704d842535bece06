"""murmur: decentralized low-bandwidth training. `swarm = murmur.join(bootstrap=[...])`, then
`opt = swarm.wrap(model, optimizer, algorithm="noloco")`; see node/hook.py."""

from node.hook import Swarm, SwarmOptimizer, join, open_swarm

__all__ = ["join", "open_swarm", "Swarm", "SwarmOptimizer"]
