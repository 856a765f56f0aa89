"""Above the layers: the `lambdalake` command line (`cli`), the local platform's services
and their supervision, the roll-out of a trained model, the demo, the JVM jars and the
Kubernetes manifests. Nothing below imports infra; the DAGs above call `rollout`.
"""

__all__ = ["cli", "rollout"]
