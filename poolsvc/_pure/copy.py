# Placeholder while the module is being written; replaced by the real reference.
gather = scatter = None
