"""Train a CAT-KD student from a kdpipe store in a plain PyTorch loop (kdpipe's public API).

    kdpipe extract-teacher --teacher runs/teacher/resnet20_vanilla/ckpt_epoch_240.pth --arch resnet20 \
        --data digits --out stores/digits
    python examples/own_loop.py stores/digits --student resnet8 --epochs 2 --out student.pth

With the same settings and seed, the weights it saves equal those of
`kdpipe train-student --store stores/digits --student resnet8 --method cat_kd --epochs 2`.
"""

import argparse

import torch

import kdpipe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("store")
parser.add_argument("--student", default="resnet8")
parser.add_argument("--method", default="cat_kd")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=None, help="default: the method's recipe (64)")
parser.add_argument("--lr", type=float, default=None, help="default: the method's recipe (0.05)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cpu")
parser.add_argument("--out", default="student.pth")
args = parser.parse_args()

store = kdpipe.open_store(args.store)
settings = {
    "epochs": args.epochs,
    "batch_size": args.batch_size,
    "lr": args.lr,
    "seed": args.seed,
    "device": args.device,
}
training = store.training(method=args.method, student=args.student, **settings)
model = training.build_student()
optimizer = training.make_optimizer(model)  # SGD with the method's reference recipe
scheduler = training.make_scheduler(optimizer)
for epoch in range(training.epochs):
    model.train()
    for batch in training.batches(epoch):  # replayed views applied; targets on the device
        logits, features = training.forward(model, batch.images)
        loss, parts = training.method.loss(logits, features, batch.targets, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scheduler.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test {training.evaluate(model)}")
torch.save(model.state_dict(), args.out)
