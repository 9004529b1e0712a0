# Placeholder while the module is being written; replaced by the real reference.
pagelist_build = pagelist_build_into = pagelist_parse = pagelist_segments = None
