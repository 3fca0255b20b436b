"""Fetches and unpacks the public iNaturalist 12K archive when data_dir does not exist yet."""

import http.client
import os
import pathlib
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib

import tqdm

from cnn import errors

class DownloadError(errors.UserError):
  """data_dir is missing and the archive could not be fetched or unpacked; says what to do."""


def fetch(url: str, dest: pathlib.Path, timeout: float = 30.0) -> None:
  """Downloads `url` to `dest`, resuming a `dest.part` left by an earlier try."""
  part = dest.with_name(dest.name + '.part')
  have = part.stat().st_size if part.exists() else 0
  request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    if have and response.status != 206:  # the server ignored Range: start over
      have = 0
    total = response.length + have if response.length is not None else None
    with open(part, 'ab' if have else 'wb') as f, tqdm.tqdm(
        total=total, initial=have, unit='B', unit_scale=True, desc=dest.name) as bar:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        bar.update(len(chunk))
  if total is not None and part.stat().st_size != total:
    raise DownloadError(f'download of {url} stopped at {part.stat().st_size} of {total} bytes; '
                        'run again to resume')
  os.replace(part, dest)


def extract(archive: pathlib.Path, into: pathlib.Path) -> None:
  """Checks the zip's CRCs, unpacks it beside `into` and renames it into place at once."""
  try:
    with zipfile.ZipFile(archive) as z:
      bad = z.testzip()
      if bad is not None:
        raise DownloadError(f'{archive} is corrupt ({bad} fails its CRC); delete it and run again')
      tmp = into.with_name(into.name + '.extracting')
      shutil.rmtree(tmp, ignore_errors=True)
      z.extractall(tmp)
  except zipfile.BadZipFile as e:
    raise DownloadError(f'{archive} is not a valid zip ({e}); delete it and run again') from None
  except zlib.error as e:  # damaged compressed data: testzip only reports CRC mismatches
    raise DownloadError(f'{archive} is corrupt ({e}); delete it and run again') from None
  for name in os.listdir(tmp):
    target = into / name
    if not target.exists():
      os.replace(tmp / name, target)
  shutil.rmtree(tmp, ignore_errors=True)


def ensure_dataset(config) -> None:
  """Makes `config.data_dir` exist: untouched if present, else downloaded when allowed."""
  data_dir = pathlib.Path(config.data_dir)
  if data_dir.exists():
    return
  where = (f'Put the data at {data_dir} (it must hold train/<class>/ and val/<class>/) or point '
           f'at it with --config.data_dir=PATH')
  if not config.download:
    raise DownloadError(f'data_dir {data_dir} does not exist and download is off. {where}')
  parent = data_dir.parent
  parent.mkdir(parents=True, exist_ok=True)
  archive = parent / os.path.basename(config.dataset_url.split('?')[0])
  try:
    if not archive.exists():
      print(f'downloading {config.dataset_url} to {archive}')
      fetch(config.dataset_url, archive)
  except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
    # Refused, unreachable, timed out (OSErrors), a reply that is not HTTP, or a dataset_url
    # that urllib cannot parse (ValueError): all fixed by putting the data there by hand.
    raise DownloadError(f'could not download {config.dataset_url} ({e}). {where}, or download '
                        'the archive yourself and unzip it there') from None
  print(f'extracting {archive} into {parent}')
  extract(archive, parent)
  if not data_dir.exists():
    raise DownloadError(f'{archive} unpacked into {parent} but has no {data_dir.name}/: it holds '
                        f'{sorted(os.listdir(parent))}. Set --config.data_dir to the folder that '
                        'holds train/ and val/')
