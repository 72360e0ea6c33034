"""OpenGait checkpoint interop: OpenGait-layout state dicts (built here from OpenGait's key names
and layer shapes) load strictly into GaitGL / GaitSet / GaitBase and give the embeddings that an
independent forward reading the same weights *by OpenGait's names* gives; export round-trips;
bad checkpoints are named; the evaluate CLI reports an OpenGait checkpoint."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgait.models import GaitBase, GaitGL, GaitSet, build_model, from_opengait, to_opengait
from fastgait.models.network import opengait_init

LRELU = 0.01


# --- OpenGait's key names and shapes (opengait/modeling/models/{gaitgl,gaitset,baseline}.py) -----

def gaitgl_layout(dataset, classes, bnneck=False):
    """OpenGait's GaitGL state dict layout: ``[(key, shape)]`` in its order."""
    k3 = (3, 3, 3)
    if dataset == "casia-b":
        c = [32, 64, 128]
        keys = [("conv3d.0.conv3d.weight", (32, 1, *k3)), ("LTA.0.conv3d.weight", (32, 32, 3, 1, 1))]
        stages = [("GLConvA0", 32, 64), ("GLConvA1", 64, 128), ("GLConvB2", 128, 128)]
    else:
        c = [32, 64, 128, 256]
        keys = [("conv3d.0.conv3d.weight", (32, 1, *k3)), ("conv3d.2.conv3d.weight", (32, 32, *k3)),
                ("LTA.0.conv3d.weight", (32, 32, 3, 1, 1))]
        stages = [("GLConvA0.0", 32, 64), ("GLConvA0.1", 64, 64), ("GLConvA1.0", 64, 128),
                  ("GLConvA1.1", 128, 128), ("GLConvB2.0", 128, 256), ("GLConvB2.1", 256, 256)]
    for name, cin, cout in stages:
        keys += [(f"{name}.global_conv3d.conv3d.weight", (cout, cin, *k3)),
                 (f"{name}.local_conv3d.conv3d.weight", (cout, cin, *k3))]
    keys += [("HPP.p", (1,)), ("Head0.fc_bin", (64, c[-1], c[-1]))]
    if bnneck:
        keys += [("BNNecks.fc_bin", (64, c[-1], classes))] + _bn("BNNecks.bn1d", c[-1] * 64)
    else:
        keys += _bn("Bn", c[-1]) + [("Head1.fc_bin", (64, c[-1], classes))]
    return keys


def _bn(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def gaitset_layout(c=(1, 32, 64, 128), parts=62, out=256):
    keys = []
    for name, cin, cout, k in [("set_block1.forward_block", c[0], c[1], 5), ("set_block2.forward_block", c[1], c[2], 3),
                               ("set_block3.forward_block", c[2], c[3], 3), ("gl_block2", c[1], c[2], 3),
                               ("gl_block3", c[2], c[3], 3)]:
        keys += [(f"{name}.0.conv.weight", (cout, cin, k, k)), (f"{name}.2.conv.weight", (cout, cout, 3, 3))]
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    return [keys[i] for i in order] + [("Head.fc_bin", (parts, c[3], out))]


def gaitbase_layout(channels=(64, 128, 256, 512), strides=(1, 2, 2, 1), bins=16, out=256, classes=74):
    """OpenGait's Baseline with ResNet9 (torchvision BasicBlock naming), one block per layer."""
    b = "Backbone.forward_block"
    keys = [(f"{b}.conv1.conv.weight", (channels[0], 1, 3, 3))] + _bn(f"{b}.bn1", channels[0])
    inplanes = channels[0]
    for i, (planes, stride) in enumerate(zip(channels, strides)):
        p = f"{b}.layer{i + 1}.0"
        keys += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + _bn(f"{p}.bn1", planes)
        keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
        if stride != 1 or inplanes != planes:
            keys += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.downsample.1", planes)
        inplanes = planes
    keys += [("FCs.fc_bin", (bins, channels[-1], out)), ("BNNecks.fc_bin", (bins, out, classes))]
    keys += _bn("BNNecks.bn1d", out * bins)
    return keys


def random_state(layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key == "HPP.p":
            state[key] = torch.full(shape, 3.0) + torch.rand(shape, generator=gen)
        else:
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=gen) / fan ** 0.5
    return state


# --- independent forwards that read OpenGait's weights by name (evaluation mode) ----------------

def _bn_eval(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], False, 0.0, 1e-5)


def _sep_fc(x, weight):
    return x.permute(2, 0, 1).matmul(weight).permute(1, 2, 0)


def _bnneck(x, sd):
    n, c, p = x.shape
    feat = _bn_eval(x.reshape(n, c * p), sd, "BNNecks.bn1d").view(n, c, p).permute(2, 0, 1)
    logits = F.normalize(feat, dim=-1).matmul(F.normalize(sd["BNNecks.fc_bin"], dim=1))
    return logits.permute(1, 2, 0)


def opengait_gaitgl(sd, sils, dataset):
    x = sils.unsqueeze(1)
    x = F.leaky_relu(F.conv3d(x, sd["conv3d.0.conv3d.weight"], padding=1), LRELU)
    if dataset == "oumvlp":
        x = F.leaky_relu(F.conv3d(x, sd["conv3d.2.conv3d.weight"], padding=1), LRELU)
    x = F.leaky_relu(F.conv3d(x, sd["LTA.0.conv3d.weight"], stride=(3, 1, 1)), LRELU)

    def gl(prefix, x, halving, fm_sign):
        g = F.conv3d(x, sd[f"{prefix}.global_conv3d.conv3d.weight"], padding=1)
        strips = x.split(x.shape[3] // 2**halving, 3)
        local = torch.cat([F.conv3d(s, sd[f"{prefix}.local_conv3d.conv3d.weight"], padding=1) for s in strips], 3)
        if fm_sign:
            return F.leaky_relu(torch.cat([g, local], 3), LRELU)
        return F.leaky_relu(g, LRELU) + F.leaky_relu(local, LRELU)

    if dataset == "casia-b":
        x = F.max_pool3d(gl("GLConvA0", x, 3, False), (1, 2, 2))
        x = gl("GLConvB2", gl("GLConvA1", x, 3, False), 3, True)
    else:
        x = F.max_pool3d(gl("GLConvA0.1", gl("GLConvA0.0", x, 1, False), 1, False), (1, 2, 2))
        x = gl("GLConvA1.1", gl("GLConvA1.0", x, 1, False), 1, False)
        x = gl("GLConvB2.1", gl("GLConvB2.0", x, 1, False), 1, True)
    x = x.amax(2)
    n, c = x.shape[:2]
    p = sd["HPP.p"]
    z = x.reshape(n, c, 64, -1).clamp(min=1e-6).pow(p).mean(-1).pow(1 / p)
    gait = _sep_fc(z, sd["Head0.fc_bin"])
    if "Bn.weight" in sd:
        embed = _bn_eval(gait, sd, "Bn")
        return embed, _sep_fc(embed, sd["Head1.fc_bin"])
    return gait, _bnneck(gait, sd)


def _hpp(x, bins):
    n, c = x.shape[:2]
    out = []
    for b in bins:
        z = x.reshape(n, c, b, -1)
        out.append(z.mean(-1) + z.max(-1)[0])
    return torch.cat(out, -1)


def opengait_gaitset(sd, sils):
    n, s, h, w = sils.shape

    def block(prefix, x, k, pool):
        x = F.leaky_relu(F.conv2d(x, sd[f"{prefix}.0.conv.weight"], padding=k // 2), LRELU)
        x = F.leaky_relu(F.conv2d(x, sd[f"{prefix}.2.conv.weight"], padding=1), LRELU)
        return F.max_pool2d(x, 2) if pool else x

    def set_max(x):
        return x.view(n, s, *x.shape[1:]).amax(1)

    frames = sils.reshape(n * s, 1, h, w)
    outs = block("set_block1.forward_block", frames, 5, True)
    gl = block("gl_block2", set_max(outs), 3, True)
    outs = block("set_block2.forward_block", outs, 3, True)
    gl = block("gl_block3", gl + set_max(outs), 3, False)
    outs = set_max(block("set_block3.forward_block", outs, 3, False))
    gl = gl + outs
    bins = [16, 8, 4, 2, 1]
    return _sep_fc(torch.cat([_hpp(outs, bins), _hpp(gl, bins)], -1), sd["Head.fc_bin"])


def opengait_gaitbase(sd, sils, strides=(1, 2, 2, 1)):
    n, s, h, w = sils.shape
    b = "Backbone.forward_block"
    x = F.relu(_bn_eval(F.conv2d(sils.reshape(n * s, 1, h, w), sd[f"{b}.conv1.conv.weight"], padding=1), sd, f"{b}.bn1"))
    for i, stride in enumerate(strides):
        p = f"{b}.layer{i + 1}.0"
        out = F.relu(_bn_eval(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
        out = _bn_eval(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
        if f"{p}.downsample.0.weight" in sd:
            x = _bn_eval(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
        x = F.relu(out + x)
    x = x.view(n, s, *x.shape[1:]).amax(1)
    embed = _sep_fc(_hpp(x, [16]), sd["FCs.fc_bin"])
    return embed, _bnneck(embed, sd)


# --- the cases -----------------------------------------------------------------------------------

CASES = {
    "gaitgl_casia-b": (lambda: gaitgl_layout("casia-b", 74), {"name": "GaitGL", "preset": "casia-b", "num_classes": "auto"},
                       lambda sd, x: opengait_gaitgl(sd, x, "casia-b")),
    "gaitgl_casia-b_bnneck": (lambda: gaitgl_layout("casia-b", 20, bnneck=True), {"name": "GaitGL", "preset": "casia-b"},
                              lambda sd, x: opengait_gaitgl(sd, x, "casia-b")),
    "gaitgl_oumvlp": (lambda: gaitgl_layout("oumvlp", 12), {"name": "GaitGL", "preset": "oumvlp", "num_classes": 12},
                      lambda sd, x: opengait_gaitgl(sd, x, "oumvlp")),
    "gaitset_casia-b": (gaitset_layout, {"name": "GaitSet", "preset": "casia-b"}, lambda sd, x: opengait_gaitset(sd, x)),
    "gaitbase_casia-b": (lambda: gaitbase_layout(classes=10), {"name": "GaitBase", "preset": "casia-b", "num_classes": "auto"},
                         lambda sd, x: opengait_gaitbase(sd, x)),
}


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_opengait_state_dict_loads_strictly_and_gives_the_same_embeddings(case):
    layout_fn, config, reference = CASES[case]
    layout = layout_fn()
    state = random_state(layout)
    model = from_opengait({"model": state, "optimizer": {}, "scheduler": {}, "iteration": 80000}, config).eval()
    assert list(to_opengait(model)) == [k for k, _ in layout]
    sils = torch.rand(2, 6, 64, 44, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = _outputs(model(sils))
        theirs = _outputs(reference(state, sils))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trips(case):
    _, config, _ = CASES[case]
    config = {k: (10 if v == "auto" else v) for k, v in config.items()}
    if case.endswith("bnneck"):
        config["head"], config["num_classes"] = "bnneck", 20
    torch.manual_seed(3)
    model = build_model(config).eval()
    exported = to_opengait(model)
    reloaded = from_opengait(exported, config).eval()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    sils = torch.rand(1, 4, 64, 44)
    with torch.no_grad():
        for a, b in zip(_outputs(model(sils)), _outputs(reloaded(sils))):
            assert torch.equal(a, b)


def test_gaitgl_key_lists_are_opengaits():
    assert len(gaitgl_layout("casia-b", 74)) == 16 and len(gaitgl_layout("oumvlp", 5153)) == 23
    assert list(to_opengait(GaitGL("casia-b"))) == [k for k, _ in gaitgl_layout("casia-b", 74)]
    assert list(to_opengait(GaitGL("oumvlp", num_classes=7))) == [k for k, _ in gaitgl_layout("oumvlp", 7)]
    assert list(to_opengait(GaitSet())) == [k for k, _ in gaitset_layout()]
    assert list(to_opengait(GaitBase())) == [k for k, _ in gaitbase_layout()]


def test_bad_checkpoints_name_the_key():
    state = random_state(gaitgl_layout("casia-b", 74))
    config = {"name": "GaitGL", "preset": "casia-b"}
    missing = dict(state)
    del missing["GLConvA1.local_conv3d.conv3d.weight"]
    with pytest.raises(ValueError, match="GLConvA1.local_conv3d.conv3d.weight"):
        from_opengait(missing, config)
    extra = {**state, "Head2.fc_bin": torch.zeros(1)}
    with pytest.raises(ValueError, match="Head2.fc_bin"):
        from_opengait(extra, config)
    with pytest.raises(ValueError, match=r"'Head1.fc_bin' has shape \(64, 128, 74\).*\(64, 128, 50\)"):
        from_opengait(state, {**config, "num_classes": 50})
    with pytest.raises(ValueError, match="conv3d.2.conv3d.weight"):  # the OU-MVLP layout asked of a CASIA-B file
        from_opengait(state, {**config, "preset": "oumvlp"})
    with pytest.raises(ValueError, match="no OpenGait counterpart"):
        from_opengait(state, {"name": "GaitMask", "preset": "casia-b"})
    with pytest.raises(FileNotFoundError):
        from_opengait("/nonexistent/GaitGL-80000.pt", config)


def test_opengait_initialisation():
    torch.manual_seed(0)
    model = GaitBase("tiny", num_classes=5)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([m.weight.detach() for m in bn])
    assert 0.9 < weights.mean() < 1.1 and 0.005 < weights.std() < 0.05  # N(1, 0.02), not PyTorch's ones
    assert all(torch.count_nonzero(m.bias) == 0 for m in bn)
    conv = model.Backbone.forward_block.layer2[0].conv1.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (conv.shape[1] * 9 + conv.shape[0] * 9)) ** 0.5
    assert conv.abs().max() <= bound and conv.abs().max() > 0.9 * bound
    gl = GaitGL("casia-b").stem[0].conv.weight
    assert gl.abs().max() <= (6 / (27 + 32 * 27)) ** 0.5
    assert GaitGL("casia-b", init="pytorch").stem[0].conv.weight.abs().max() > (6 / (27 + 32 * 27)) ** 0.5
    with pytest.raises(ValueError, match="init"):
        GaitSet("tiny", init="kaiming")


def test_evaluate_cli_reports_an_opengait_checkpoint(tmp_path, capsys):
    from fastgait.data import save_sequence, write_partition
    from fastgait.evaluate import main as evaluate_main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    subjects = ["001", "002"]
    for subject in subjects:
        for seq in ("nm-01", "nm-05", "bg-01", "cl-01"):
            for view in ("000", "090"):
                sils = (rng.random((3, 64, 64)) > 0.7).astype(np.uint8) * 255
                save_sequence(root / subject / seq / view / f"{view}.pkl", sils)
    write_partition(root / "partition.json", [], subjects)
    checkpoint = tmp_path / "GaitGL-80000.pt"
    torch.save({"model": random_state(gaitgl_layout("casia-b", 74)), "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 80000}, "iteration": 80000}, checkpoint)
    code = evaluate_main(["--checkpoint", str(checkpoint), "--config", "gaitgl_casia-b", f"data.root={root}",
                          "data.split=null", "eval.workers=0",
                          "--output", str(tmp_path / "eval"), "--no-baseline", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| model NM |" in captured.out
    report = json.loads((tmp_path / "eval" / "rank1_GaitGL-80000.json").read_text())
    assert set(report) == {"NM", "BG", "CL"}
    # without --config the error says what is missing
    assert evaluate_main(["--checkpoint", str(checkpoint), "--no-baseline"]) == 2
    assert "--config" in capsys.readouterr().err
