"""Exercise 5, measured: the DenseNet idea in an MLP, on a small regression data set that
scikit-learn ships (diabetes progression: 442 patients, 10 features), against a plain MLP
of the same depth."""

import torch
from sklearn.datasets import load_diabetes
from torch import nn


class DenseMLPBlock(nn.Module):
    """`num_layers` BN-ReLU-Linear layers; each one's output is concatenated to its input."""

    def __init__(self, num_layers, input_features, growth):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm1d(input_features + i * growth), nn.ReLU(), nn.Linear(input_features + i * growth, growth)
            )
            for i in range(num_layers)
        )

    def forward(self, X):
        for layer in self.layers:
            X = torch.cat((X, layer(X)), dim=1)
        return X


def dense_mlp(features, growth=16, num_layers=4):
    width = features + num_layers * growth
    return nn.Sequential(
        DenseMLPBlock(num_layers, features, growth), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1)
    )


def plain_mlp(features, width=32, num_layers=4):
    layers, size = [], features
    for _ in range(num_layers):
        layers += [nn.Linear(size, width), nn.BatchNorm1d(width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 1))


torch.manual_seed(0)
torch.set_num_threads(1)  # a model this small runs fastest on one thread
X, y = load_diabetes(return_X_y=True)
X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]
X = (X - X.mean(0)) / X.std(0)
y_mean, y_std = y.mean(), y.std()
order = torch.randperm(len(X))
train, test = order[:342], order[342:]


def rmse(net, index):
    net.eval()
    with torch.no_grad():
        return float(((net(X[index]) * y_std + y_mean - y[index]) ** 2).mean().sqrt())


print(
    f"{len(train)} training and {len(test)} test patients; the target's standard deviation: {float(y[test].std()):.1f}"
)
print()
print("| model | parameters | training RMSE | test RMSE |")
print("| --- | ---: | ---: | ---: |")
for name, net in (
    ("dense MLP (growth 16, 4 layers)", dense_mlp(10)),
    ("plain MLP (width 32, 4 layers)", plain_mlp(10)),
):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        net.train()
        batch = train[torch.randint(len(train), (64,))]
        loss = nn.functional.mse_loss(net(X[batch]), (y[batch] - y_mean) / y_std)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    error = rmse(net, test)
    assert error < float(y[test].std()), error  # better than predicting the mean
    print(f"| {name} | {sum(p.numel() for p in net.parameters()):,} | {rmse(net, train):.1f} | {error:.1f} |")
