"""Fetching the archive from a local HTTP server: resume, verification, extraction, clear errors."""

import functools
import http.server
import io
import pathlib
import re
import socket
import threading
import time
import zipfile

import numpy as np
import pytest

from cnn import download
from cnn import errors
from cnn import input_pipeline
from cnn.download import DownloadError
from tests.conftest import write_image_folder


class _Server:
  """Serves `files` on 127.0.0.1 with Range support; records what each request asked and got."""

  def __init__(self, files: dict[str, bytes]):
    self.files = files
    self.honour_range = True
    self.cut_next_after: int | None = None  # drop the next response after this many bytes
    self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, bytes sent)
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):
        data = server.files.get(self.path)
        if data is None:
          self.send_error(404)
          server.requests.append((self.path, None, 0))
          return
        asked = self.headers.get('Range')
        start = 0
        match = re.fullmatch(r'bytes=(\d+)-', asked or '')
        if match and server.honour_range:
          start = int(match.group(1))
          self.send_response(206)
          self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
          self.send_response(200)
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if server.cut_next_after is not None:
          body, server.cut_next_after = body[:server.cut_next_after], None
          self.close_connection = True
        self.wfile.write(body)
        server.requests.append((self.path, asked, len(body)))

      def log_message(self, *args):
        pass

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def close(self):
    self._httpd.shutdown()
    self._httpd.server_close()


def _zip(folder: pathlib.Path, top: str) -> bytes:
  """`folder`'s files under `top/` in a zip, as the real archive holds inaturalist_12K/."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    for p in sorted(folder.rglob('*')):
      if p.is_file():
        z.write(p, f'{top}/{p.relative_to(folder)}')
  return buf.getvalue()


@pytest.fixture(scope='module')
def archive(tmp_path_factory) -> bytes:
  folder = write_image_folder(tmp_path_factory.mktemp('src'), {'train': 4, 'val': 2}, size=20)
  return _zip(folder, 'inaturalist_12K')


@pytest.fixture
def server(archive):
  s = _Server({'/nature_12K.zip': archive})
  yield s
  s.close()


@pytest.fixture
def config(tiny_config, tmp_path, server):
  tiny_config.data_dir = str(tmp_path / 'data' / 'inaturalist_12K')
  tiny_config.cache_dir = str(tmp_path / 'cache')
  tiny_config.image_size = 16
  tiny_config.download = True
  tiny_config.dataset_url = f'{server.url}/nature_12K.zip'
  return tiny_config


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _leftovers(root: pathlib.Path) -> list[str]:
  """Half-downloaded or half-extracted files anywhere under `root`."""
  return sorted(p.name for p in root.rglob('*') if p.name.endswith(('.part', '.extracting')))


def test_downloads_verifies_extracts_and_the_data_loads(config, server, archive, tmp_path):
  download.ensure_dataset(config)
  parent = tmp_path / 'data'
  assert (parent / 'nature_12K.zip').read_bytes() == archive
  assert _leftovers(tmp_path) == []
  assert server.requests == [('/nature_12K.zip', None, len(archive))]
  ds = input_pipeline.load_dataset(config)
  assert ds.class_names == ['blue', 'green', 'red']
  assert len(ds.train_labels) + len(ds.holdout_labels) == 12 and len(ds.test_labels) == 6
  # Pixels survived the trip: the red folder's images are red.
  red = ds.test_images[ds.test_labels == 2].astype(float).mean((0, 1, 2))
  assert red[0] > red[1] + 60 and red[0] > red[2] + 60
  download.ensure_dataset(config)  # present now: no second download
  assert len(server.requests) == 1


def test_a_partial_download_is_resumed_from_where_it_stopped(config, server, archive, tmp_path):
  (tmp_path / 'data').mkdir()
  have = len(archive) * 2 // 5
  (tmp_path / 'data' / 'nature_12K.zip.part').write_bytes(archive[:have])
  download.ensure_dataset(config)
  assert server.requests == [('/nature_12K.zip', f'bytes={have}-', len(archive) - have)]
  assert (tmp_path / 'data' / 'nature_12K.zip').read_bytes() == archive
  assert (tmp_path / 'data' / 'inaturalist_12K' / 'val' / 'red').is_dir()


def test_a_server_that_ignores_range_gets_a_fresh_download(config, server, archive, tmp_path):
  server.honour_range = False
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'nature_12K.zip.part').write_bytes(b'stale bytes of another file')
  download.ensure_dataset(config)
  assert server.requests[0][2] == len(archive)
  assert (tmp_path / 'data' / 'nature_12K.zip').read_bytes() == archive


def test_a_dropped_connection_says_run_again_and_the_rerun_resumes(config, server, archive,
                                                                    tmp_path):
  server.cut_next_after = len(archive) // 2
  with pytest.raises(DownloadError) as e:
    download.ensure_dataset(config)
  assert f'stopped at {len(archive) // 2} of {len(archive)} bytes; run again to resume' in str(
      e.value)
  assert not (tmp_path / 'data' / 'inaturalist_12K').exists()
  assert (tmp_path / 'data' / 'nature_12K.zip.part').stat().st_size == len(archive) // 2
  download.ensure_dataset(config)
  assert server.requests[-1] == ('/nature_12K.zip', f'bytes={len(archive) // 2}-',
                                 len(archive) - len(archive) // 2)
  assert (tmp_path / 'data' / 'nature_12K.zip').read_bytes() == archive
  assert len(input_pipeline.load_dataset(config).test_labels) == 6


def _flip_inside_first_member(data: bytes) -> bytes:
  """The zip with one byte of its first member's compressed data inverted."""
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    info = z.infolist()[0]
  name_len, extra_len = np.frombuffer(data[info.header_offset + 26:info.header_offset + 30],
                                      '<u2')
  at = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size // 2
  return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize('kind', ['not_a_zip', 'crc', 'deflate'])
def test_a_corrupt_archive_is_a_clear_error_and_nothing_is_extracted(config, server, archive,
                                                                     tmp_path, kind):
  if kind == 'not_a_zip':
    bad = b'<html>502 Bad Gateway</html>'
  elif kind == 'crc':
    bad = _flip_inside_first_member(archive)
  else:  # a compressible member, so the flipped byte breaks the deflate stream, not just the CRC
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
      z.writestr('inaturalist_12K/README.txt', 'the same line again\n' * 400)
    bad = _flip_inside_first_member(buf.getvalue())
  server.files['/nature_12K.zip'] = bad
  with pytest.raises(DownloadError) as e:
    download.ensure_dataset(config)
  path = tmp_path / 'data' / 'nature_12K.zip'
  message = str(e.value)
  assert message.startswith(f'{path} is ') and message.endswith('; delete it and run again')
  assert {'not_a_zip': 'is not a valid zip (File is not a zip file)',
          'crc': 'is corrupt (inaturalist_12K/train/blue/blue_0.jpg fails its CRC)',
          'deflate': 'is corrupt (Error -3 while decompressing data'}[kind] in message
  assert not (tmp_path / 'data' / 'inaturalist_12K').exists()
  assert _leftovers(tmp_path) == []


def test_an_archive_without_the_expected_folder_says_what_it_holds(config, server, tmp_path):
  src = tmp_path / 'src'
  write_image_folder(src, {'train': 1, 'val': 1}, size=20)
  server.files['/nature_12K.zip'] = _zip(src, 'nature_12K')
  with pytest.raises(DownloadError) as e:
    download.ensure_dataset(config)
  assert "has no inaturalist_12K/: it holds ['nature_12K', 'nature_12K.zip']" in str(e.value)
  assert 'Set --config.data_dir to the folder that holds train/ and val/' in str(e.value)


def test_no_server_fails_at_once_saying_where_to_put_the_data(config, tmp_path):
  config.dataset_url = f'http://127.0.0.1:{_closed_port()}/nature_12K.zip'
  t0 = time.perf_counter()
  with pytest.raises(DownloadError) as e:
    download.ensure_dataset(config)
  assert time.perf_counter() - t0 < 5
  message = str(e.value)
  assert message.startswith(f'could not download {config.dataset_url} (')
  assert 'Connection refused' in message
  assert f'Put the data at {config.data_dir} (it must hold train/<class>/ and val/<class>/)' in (
      message)
  assert '--config.data_dir=PATH' in message
  assert 'download the archive yourself and unzip it there' in message
  assert not pathlib.Path(config.data_dir).exists()
  # main prints a UserError as one `error:` line.
  assert isinstance(e.value, errors.UserError) and '\n' not in message


def test_a_server_that_never_answers_times_out_with_the_same_advice(config, monkeypatch):
  with socket.socket() as listening:  # the kernel accepts the connection; nobody replies
    listening.bind(('127.0.0.1', 0))
    listening.listen()
    config.dataset_url = f'http://127.0.0.1:{listening.getsockname()[1]}/nature_12K.zip'
    monkeypatch.setattr(download, 'fetch', functools.partial(download.fetch, timeout=0.2))
    with pytest.raises(DownloadError) as e:
      download.ensure_dataset(config)
  message = str(e.value)
  assert message.startswith(f'could not download {config.dataset_url} (timed out)'), message
  assert '--config.data_dir=PATH' in message and '\n' not in message


def test_a_missing_file_on_the_server_is_a_clear_error(config):
  config.dataset_url = config.dataset_url.replace('nature_12K', 'moved')
  with pytest.raises(DownloadError, match=r'could not download .*moved\.zip \(HTTP Error 404'):
    download.ensure_dataset(config)


def test_download_off_and_no_data(config, server):
  config.download = False
  with pytest.raises(DownloadError) as e:
    download.ensure_dataset(config)
  assert str(e.value) == (
      f'data_dir {config.data_dir} does not exist and download is off. Put the data at '
      f'{config.data_dir} (it must hold train/<class>/ and val/<class>/) or point at it with '
      '--config.data_dir=PATH')
  assert server.requests == []
