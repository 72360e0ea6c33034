"""OpenGait's module contracts, for swapping fastgait's modules into a model trained by OpenGait.

```python
# from opengait.modeling.losses import TripletLoss, CrossEntropyLoss      # before
from fastgait.nn.opengait import TripletLoss, CrossEntropyLoss            # after
```

Every class here takes OpenGait's constructor arguments, returns what OpenGait's returns and
holds OpenGait's state-dict keys.
"""
from .gaitgl import GLConv
from .heads import SeparateBNNecks, SeparateFCs
from .losses import CrossEntropyLoss
from .losses import OpenGaitTripletLoss as TripletLoss
from .pooling import GeMHPP, HorizontalPoolingPyramid

__all__ = ["TripletLoss", "CrossEntropyLoss", "GLConv", "GeMHPP", "SeparateFCs", "SeparateBNNecks",
           "HorizontalPoolingPyramid"]
