"""A network of your own, served by SplitExit's three tiers (the example of docs/models.md).

Importing this module registers the backbone ``mynet``; give the module to every command with
``--plugin examples.my_models``. Any ``nn.Module`` that ``torch.fx`` can trace works the same way: name the modules
after which a tier may hand over, and the converter makes the stages and checks that nothing else crosses a cut.
"""
import torch
from torch import nn

from common.model import register_backbone
from common.model.convert import convert


# [docs:network]
class Block(nn.Module):
    """Two 3x3 convolutions with a shortcut around them."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class MyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        c = max(8, round(32 * width))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = Block(c, c, 1)
        self.block2 = Block(c, 2 * c, 2)
        self.block3 = Block(2 * c, 4 * c, 2)
        self.fc = nn.Linear(4 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
# [/docs:network]


# [docs:register]
@register_backbone("mynet", exit_points=(2, 3))  # device: stem + block1, edge: block2, cloud: block3 + fc
def mynet(num_classes: int = 10, width: float = 1.0, in_channels: int = 3):
    model = MyNet(num_classes, width, in_channels)
    return convert(model, ["stem", "block1", "block2", "block3"], num_classes)
# [/docs:register]
