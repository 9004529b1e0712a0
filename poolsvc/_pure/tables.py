# Placeholder while the module is being written; replaced by the real reference.
AddressMap = FrameTable = IdTable = None
