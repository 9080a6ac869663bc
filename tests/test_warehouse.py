"""The warehouse: image configuration files (xsd/vmimage-1.0.xsd) and index.txt."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmplant_service.warehouse import ImageInfo, Warehouse, load_image_config
from vmshop_common.cost import Bid, CostModel
from vmshop_common.dag import BlankStart, Hardware
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import (
    ConfigurationError,
    DagInvalidError,
    DoctypeRefusedError,
    NoSuchImageError,
    SchemaInvalidError,
    WrongRootError,
    XMLSyntaxError,
)

QCOW2 = b"QFI\xfb\x00\x00\x00\x03" + bytes(504)

DAG = """  <dag xmlns="urn:vmshop:dag:1">
    <nodes>
      <blank id="hw" memory="128" vcpus="1" disk="1" arch="x86_64"/>
      <script id="os" interpreter="/bin/sh">#vmshop-os: tiny busybox linux 1</script>
    </nodes>
    <edges><edge from="hw" to="os"/></edges>
  </dag>"""


def image_xml(name: str = "tiny", disk: str = 'file="disk.qcow2" format="qcow2"',
              boot: str | None = 'kernel="vmlinux" initrd="initrd.img" cmdline="console=ttyS0 quiet" machine="q35"',
              hardware: str = 'memory="128" vcpus="1" disk="1" arch="x86_64"', dag: str = DAG) -> str:
    boot_line = f"  <boot {boot}/>\n" if boot is not None else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<image xmlns="urn:vmshop:image:1" name="{name}">\n'
            f"  <disk {disk}/>\n{boot_line}  <hardware {hardware}/>\n{dag}\n</image>\n")


def make_image(directory: Path, name: str = "tiny", xml: str | None = None, disk_bytes: bytes = QCOW2) -> Path:
    """An image directory with a (fake) qcow2 disk, kernel and initrd; returns its image.xml."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "disk.qcow2").write_bytes(disk_bytes)
    (directory / "vmlinux").write_bytes(b"kernel")
    (directory / "initrd.img").write_bytes(b"initrd")
    config = directory / "image.xml"
    config.write_text(xml if xml is not None else image_xml(name), encoding="utf-8")
    return config


def write_index(warehouse: Path, *lines: str | Path) -> None:
    warehouse.mkdir(parents=True, exist_ok=True)
    (warehouse / "index.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


# One image configuration file -------------------------------------------------

def test_load_image_config(tmp_path: Path) -> None:
    config = make_image(tmp_path / "tiny")
    info = load_image_config(config)
    assert isinstance(info, ImageInfo)
    assert info.name == "tiny"
    assert info.config_path == config.resolve()
    assert info.disk == (tmp_path / "tiny" / "disk.qcow2").resolve() and info.disk.is_absolute()
    assert info.disk_format == "qcow2"
    assert info.kernel == (tmp_path / "tiny" / "vmlinux").resolve()
    assert info.initrd == (tmp_path / "tiny" / "initrd.img").resolve()
    assert info.cmdline == "console=ttyS0 quiet" and info.machine == "q35"
    assert info.hardware == Hardware(memory=128, vcpus=1, disk=1, arch="x86_64")
    assert isinstance(info.dag.start, BlankStart) and [a.id for a in info.dag.actions] == ["os"]
    cached = info.cached_image()
    assert (cached.name, cached.dag, cached.hardware) == ("tiny", info.dag, info.hardware)


def test_boot_is_optional_and_defaults(tmp_path: Path) -> None:
    info = load_image_config(make_image(tmp_path / "i", xml=image_xml(boot=None)))
    assert (info.kernel, info.initrd, info.cmdline, info.machine) == (None, None, "", "pc")
    info = load_image_config(make_image(tmp_path / "j", xml=image_xml(boot='kernel="vmlinux"')))
    assert info.kernel is not None and info.initrd is None and info.machine == "pc"


def test_raw_disk_and_absolute_paths(tmp_path: Path) -> None:
    elsewhere = tmp_path / "disks" / "root.img"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(bytes(1024))
    xml = image_xml(disk=f'file="{elsewhere}" format="raw"')
    info = load_image_config(make_image(tmp_path / "raw", xml=xml))
    assert info.disk == elsewhere.resolve() and info.disk_format == "raw"


def test_image_whose_dag_starts_from_another_image(tmp_path: Path) -> None:
    child_dag = DAG.replace('<blank id="hw" memory="128" vcpus="1" disk="1" arch="x86_64"/>',
                            '<image id="hw" name="tiny"/>')
    info = load_image_config(make_image(tmp_path / "child", xml=image_xml("child", dag=child_dag)))
    assert info.dag.start.kind == "image"


@pytest.mark.parametrize(("text", "error", "line"), [
    ("<image", XMLSyntaxError, 1),
    ('<?xml version="1.0"?>\n<!DOCTYPE image [<!ENTITY x "y">]>\n<image/>', DoctypeRefusedError, 2),
    ('<vm xmlns="urn:vmshop:dag:1"/>', WrongRootError, 1),
    (image_xml(disk='file="disk.qcow2" format="vmdk"'), SchemaInvalidError, 3),
    (image_xml(name="bad name"), SchemaInvalidError, 2),
    (image_xml(hardware='memory="12" disk="1"'), SchemaInvalidError, 5),
    (image_xml(dag=""), SchemaInvalidError, None),
    (image_xml(dag=DAG.replace('<edge from="hw" to="os"/>', '<edge from="hw" to="nope"/>')), SchemaInvalidError, 11),
    (image_xml(dag=DAG.replace("<dag ", "<vm ").replace("</dag>", "</vm>")), SchemaInvalidError, 6),
    (image_xml(dag=DAG.replace('<edges><edge from="hw" to="os"/></edges>', "")), DagInvalidError, 9),
])
def test_bad_documents(tmp_path: Path, text: str, error: type[Exception], line: int | None) -> None:
    config = make_image(tmp_path / "bad", xml=text)
    with pytest.raises(error) as caught:
        load_image_config(config)
    if line is not None:
        assert caught.value.line == line, str(caught.value)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("disk", "boot", "reason"), [
    ('file="missing.qcow2" format="qcow2"', None, "does not exist"),
    ('file="disk.qcow2" format="raw"', None, "declared raw"),
    ('file="vmlinux" format="qcow2"', None, "not a qcow2"),
    ('file="../outside.qcow2" format="qcow2"', None, "outside"),
    ('file="disk.qcow2" format="qcow2"', 'kernel="nokernel"', "kernel file"),
    ('file="disk.qcow2" format="qcow2"', 'kernel="vmlinux" initrd="/nonexistent/initrd"', "initrd file"),
    ('file="." format="qcow2"', None, "not a regular file"),
])
def test_bad_files(tmp_path: Path, disk: str, boot: str | None, reason: str) -> None:
    (tmp_path / "outside.qcow2").write_bytes(QCOW2)
    config = make_image(tmp_path / "img", xml=image_xml(disk=disk, boot=boot))
    with pytest.raises(ConfigurationError, match=reason) as caught:
        load_image_config(config)
    assert caught.value.line in (3, 4)


def test_symlink_escaping_the_image_directory_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.qcow2"
    secret.write_bytes(QCOW2)
    config = make_image(tmp_path / "img")
    (tmp_path / "img" / "disk.qcow2").unlink()
    (tmp_path / "img" / "disk.qcow2").symlink_to(secret)
    with pytest.raises(ConfigurationError, match="outside the configuration's directory"):
        load_image_config(config)
    # a symlink that stays inside is fine
    (tmp_path / "img" / "disk.qcow2").unlink()
    (tmp_path / "img" / "real.qcow2").write_bytes(QCOW2)
    (tmp_path / "img" / "disk.qcow2").symlink_to("real.qcow2")
    assert load_image_config(config).disk == (tmp_path / "img" / "real.qcow2").resolve()


def test_symlink_loop_is_an_error_not_a_crash(tmp_path: Path) -> None:
    config = make_image(tmp_path / "img")
    (tmp_path / "img" / "disk.qcow2").unlink()
    (tmp_path / "img" / "disk.qcow2").symlink_to("disk.qcow2")
    with pytest.raises(ConfigurationError):
        load_image_config(config)


def test_hardware_must_agree_with_the_dags_blank_node(tmp_path: Path) -> None:
    config = make_image(tmp_path / "a", xml=image_xml(hardware='memory="128" disk="1" arch="aarch64"'))
    with pytest.raises(ConfigurationError, match="aarch64") as caught:
        load_image_config(config)
    assert caught.value.line == 5
    config = make_image(tmp_path / "b", xml=image_xml(dag=DAG.replace('disk="1"', 'disk="4"')))
    with pytest.raises(ConfigurationError, match="smaller"):
        load_image_config(config)


def test_missing_configuration_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_image_config(tmp_path / "nope.xml")


# The warehouse -----------------------------------------------------------------

def test_warehouse_skips_bad_entries_and_keeps_the_others(tmp_path: Path) -> None:
    good = make_image(tmp_path / "images" / "tiny")
    other = make_image(tmp_path / "images" / "other", xml=image_xml("other", boot=None))
    dup = make_image(tmp_path / "images" / "dup")  # also named 'tiny'
    broken = make_image(tmp_path / "images" / "broken", xml="<image")
    nodisk = make_image(tmp_path / "images" / "nodisk", "nodisk", xml=image_xml("nodisk"))
    (tmp_path / "images" / "nodisk" / "disk.qcow2").unlink()
    warehouse_dir = tmp_path / "warehouse"
    write_index(warehouse_dir, "# cached images", "", good, "relative/image.xml", tmp_path / "missing.xml",
                broken, "   ", dup, nodisk, f"  {other}  ")
    warehouse = Warehouse(warehouse_dir)
    assert sorted(warehouse.images) == ["other", "tiny"]
    assert warehouse.images["tiny"].config_path == good.resolve()
    problems = warehouse.problems
    assert [(p.line, p.code) for p in problems] == [
        (4, "Server.Configuration"),  # not absolute
        (5, "Server.Configuration"),  # missing file
        (6, "Client.XMLSyntax"),
        (8, "Server.Configuration"),  # duplicate name
        (9, "Server.Configuration"),  # disk missing
    ]
    assert "not absolute" in problems[0].message
    assert "duplicate image name 'tiny'" in problems[3].message and "line 3" in problems[3].message
    assert problems[4].path == str(nodisk) and "line 3" in problems[4].message  # the image file's line
    assert "index.txt line 4" in str(problems[0])


def test_get_and_reload(tmp_path: Path) -> None:
    warehouse_dir = tmp_path / "warehouse"
    first = make_image(tmp_path / "a", "a", xml=image_xml("a"))
    write_index(warehouse_dir, first)
    warehouse = Warehouse(warehouse_dir)
    assert warehouse.get("a").name == "a"
    with pytest.raises(NoSuchImageError):
        warehouse.get("b")
    second = make_image(tmp_path / "b", "b", xml=image_xml("b"))
    write_index(warehouse_dir, first, second)
    assert warehouse.load() == []
    assert sorted(warehouse.images) == ["a", "b"]
    assert [c.name for c in warehouse.cached_images()] == ["a", "b"]
    warehouse.images.clear()  # a copy: the warehouse is unchanged
    assert sorted(warehouse.images) == ["a", "b"]


def test_missing_index_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "empty")
    assert warehouse.images == {}
    assert len(warehouse.problems) == 1 and warehouse.problems[0].line is None


def test_lineages_must_resolve(tmp_path: Path) -> None:
    def child(name: str, parent: str) -> Path:
        dag = DAG.replace('<blank id="hw" memory="128" vcpus="1" disk="1" arch="x86_64"/>',
                          f'<image id="hw" name="{parent}"/>').replace("busybox linux 1", f"step of {name}")
        return make_image(tmp_path / name, name, xml=image_xml(name, dag=dag))

    base = make_image(tmp_path / "tiny")
    warehouse_dir = tmp_path / "warehouse"
    write_index(warehouse_dir, base, child("app", "tiny"), child("orphan", "ghost"), child("grandorphan", "orphan"),
                child("loop1", "loop2"), child("loop2", "loop1"))
    warehouse = Warehouse(warehouse_dir)
    assert sorted(warehouse.images) == ["app", "tiny"]
    assert {p.line for p in warehouse.problems} == {3, 4, 5, 6}
    assert all(p.code == "Client.NoSuchImage" for p in warehouse.problems)


def test_an_image_serves_a_request_through_the_cost_model(tmp_path: Path) -> None:
    write_index(tmp_path / "warehouse", make_image(tmp_path / "tiny"))
    warehouse = Warehouse(tmp_path / "warehouse")
    request = load_dag("""<vm xmlns="urn:vmshop:dag:1"><nodes>
        <image id="base" name="tiny"/><script id="run" cost="2">echo hi</script></nodes>
        <edges><edge from="base" to="run"/></edges></vm>""")
    bid = CostModel().estimate(request, warehouse.cached_images())
    assert isinstance(bid, Bid) and bid.image == "tiny" and bid.remaining == ("run",)


def test_the_real_guest_image_serves_every_sample(warehouse_dir: Path) -> None:
    warehouse = Warehouse(warehouse_dir)
    assert warehouse.problems == []
    info = warehouse.get("tiny")
    assert info.disk_format == "qcow2" and info.kernel is not None and info.kernel.is_file()
    samples = Path(__file__).resolve().parent.parent / "scripts"
    for sample in sorted(samples.glob("sample_*.xml")):
        bid = CostModel().estimate(load_dag(sample.read_bytes()), warehouse.cached_images())
        expected = "debian12" if sample.name == "sample_debian.xml" else "tiny"
        assert isinstance(bid, Bid) and bid.image == expected, (sample.name, bid)
    blank = CostModel().estimate(load_dag((samples / "sample_blank.xml").read_bytes()), warehouse.cached_images())
    assert isinstance(blank, Bid) and blank.remaining == ("report",)  # the image embodies its "os" step
