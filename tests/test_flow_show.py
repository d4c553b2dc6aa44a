"""`pipeline show`: the Middlebury colour coding and the PNG of frames beside their flow."""
import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from preprocess.flow import compute_flow
from preprocess.flow_show import color_wheel, flow_to_color, render, show
from preprocess.layout import DataLayout
from test_flow import make_data, translating


def test_color_wheel_is_baker_et_als():
    wheel = color_wheel()
    assert wheel.shape == (55, 3)
    # segment starts: red, yellow, green, cyan, blue, magenta (RY 15, YG 6, GC 4, CB 11, BM 13)
    starts = np.cumsum((0, 15, 6, 4, 11, 13))
    assert wheel[starts].tolist() == [[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255],
                                      [0, 0, 255], [255, 0, 255]]
    assert wheel[1].tolist() == [255, 17, 0]      # floor(255 * 1 / 15)
    assert wheel[54].tolist() == [255, 0, 43]     # MR: blue ramps down, floor(255 * 5 / 6) off


def test_flow_colours_direction_and_speed():
    # still, right, left, half speed right, 3x the maximum right, down, up (image y is down)
    flows = np.array([[[0, 0], [1, 0], [-1, 0], [0.5, 0], [3, 0], [0, 1], [0, -1]]],
                     np.float32)
    assert flow_to_color(flows, 1.0)[0].tolist() == [
        [255, 255, 255], [255, 0, 0], [0, 209, 255], [255, 127, 127], [191, 0, 0],
        [255, 229, 0], [88, 0, 255]]
    # direction, not speed, picks the hue: twice the flow, same colour at twice the maximum
    a = flow_to_color(np.array([[[0.3, 0.4]]], np.float32), 0.5)
    b = flow_to_color(np.array([[[0.6, 0.8]]], np.float32), 1.0)
    assert a.tolist() == b.tolist()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("show")
    d = make_data(tmp, {"Right/v_r": translating(6, 64, 3, 0, seed=11),
                        "One/v_1": translating(1, 64, 0, 0)})
    assert compute_flow(d, backend="opencv", progress=False).ok
    return d


def test_picture_of_a_video(data):
    out = show(data, "Right/v_r")
    assert out == DataLayout(data).show_path("Right/v_r") == data / "show" / "Right__v_r.png"
    img = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] >= 4 * 200
    assert (img == render(data, "Right/v_r")).all()
    # four rows of 64x64 frames, each enlarged to 256 px, under a 72 px header
    assert img.shape[0] == 72 + 4 * (18 + 256 + 4)
    # the colour-coded flow tile of the first row: rightward motion is red in Baker's wheel
    tile = img[72 + 18 + 40:72 + 18 + 216, 260 + 40:260 + 216]
    b, g, r = np.median(tile.reshape(-1, 3), axis=0)
    assert r > 200 and g < 80 and b < 80


def test_picture_options_and_errors(data, tmp_path):
    out = show(data, "Right/v_r", out=tmp_path / "p.png", rows=2)
    assert cv2.imread(str(out)).shape[0] == 72 + 2 * (18 + 256 + 4)
    with pytest.raises(FileNotFoundError, match="no flow for 'Nope/v_x'"):
        show(data, "Nope/v_x")
    with pytest.raises(ValueError, match="single frame"):
        show(data, "One/v_1")
    result = CliRunner().invoke(cli, ["show", "--data", str(data), "Right/v_r", "--out",
                                      str(tmp_path / "cli.png")])
    assert result.exit_code == 0 and (tmp_path / "cli.png").stat().st_size > 0
    result = CliRunner().invoke(cli, ["show", "--data", str(data), "Nope/v_x"])
    assert result.exit_code != 0 and "pipeline flow" in result.output
