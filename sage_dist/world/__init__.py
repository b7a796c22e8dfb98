"""The bundled world: a tiny synthetic text-to-image world whose concept domains are known by construction.

* :mod:`sage_dist.world.concepts`: the concepts (shapes, colours, textures) and their domains;
* :mod:`sage_dist.world.scene`: procedural 16x16 images with exact labels and template captions;
* :mod:`sage_dist.world.model`, :mod:`sage_dist.world.train`: the tiny SD model and its SDXL twin;
* :mod:`sage_dist.world.detector`: the shape/colour/texture CNN that judges generated images.

Shipped weights (``weights/sd``, ``weights/sdxl``, ``weights/detector``; float16 storage, loaded in float32 on the
CPU) are found through :func:`sage_dist.models.registry.world_path`; the world's evaluation is
:mod:`sage_dist.eval.world`.
"""
