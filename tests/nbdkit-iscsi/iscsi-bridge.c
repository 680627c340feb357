/* nbdkit plugin: a libiscsi initiator behind nbdkit (iSCSI in, NBD out),
 * so that Linux tools (nbdfuse, losetup, mkfs, fsck) can reach corral's
 * iSCSI frontend on a machine without a kernel iSCSI initiator. Only glue:
 * the iSCSI protocol is libiscsi's. Built by scripts/build-nbdkit-iscsi.sh
 * when Debian's source of nbdkit's own iscsi plugin cannot be had. */

#define NBDKIT_API_VERSION 2
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS

/* Largest READ/WRITE we send, in bytes (less when the target says so). */
#define MAX_CHUNK (8u << 20)

static char *portal, *target, *initiator, *user, *password;
static int lun;
static int timeout = 60;

struct handle {
  struct iscsi_context *iscsi;
  uint32_t block_size;
  uint64_t blocks;
  uint32_t max_xfer;  /* blocks per READ/WRITE */
  uint32_t max_unmap; /* blocks per UNMAP; 0: no UNMAP */
};

static int
set_string (char **dst, const char *value)
{
  free (*dst);
  *dst = strdup (value);
  if (*dst == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

static void
bridge_unload (void)
{
  free (portal);
  free (target);
  free (initiator);
  free (user);
  free (password);
}

static int
bridge_config (const char *key, const char *value)
{
  if (strcmp (key, "portal") == 0)
    return set_string (&portal, value);
  if (strcmp (key, "target") == 0)
    return set_string (&target, value);
  if (strcmp (key, "initiator") == 0)
    return set_string (&initiator, value);
  if (strcmp (key, "user") == 0)
    return set_string (&user, value);
  if (strcmp (key, "password") == 0) {
    free (password);
    return nbdkit_read_password (value, &password);
  }
  if (strcmp (key, "lun") == 0) {
    if (nbdkit_parse_int ("lun", value, &lun) == -1)
      return -1;
    if (lun < 0 || lun > 255) {
      nbdkit_error ("lun must be 0..255");
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "timeout") == 0)
    return nbdkit_parse_int ("timeout", value, &timeout);
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
bridge_config_complete (void)
{
  if (target == NULL) {
    nbdkit_error ("the target=IQN parameter is required");
    return -1;
  }
  if (portal == NULL && set_string (&portal, "127.0.0.1:3260") == -1)
    return -1;
  if (initiator == NULL &&
      set_string (&initiator, "iqn.2026-11.io.corral:nbdkit-iscsi") == -1)
    return -1;
  if (user != NULL && password == NULL) {
    nbdkit_error ("user= needs password=");
    return -1;
  }
  return 0;
}

/* 0: GOOD. 1: a unit attention, retry (the task is freed). -1: failed
 * (reported, the task is freed). */
static int
check (struct handle *h, struct scsi_task **task, const char *what,
       int attempt)
{
  struct scsi_task *t = *task;

  if (t == NULL) {
    nbdkit_error ("%s: %s", what, iscsi_get_error (h->iscsi));
    nbdkit_set_error (EIO);
    return -1;
  }
  if (t->status == SCSI_STATUS_GOOD)
    return 0;
  *task = NULL;
  if (t->status == SCSI_STATUS_CHECK_CONDITION &&
      t->sense.key == SCSI_SENSE_UNIT_ATTENTION && attempt < 8) {
    nbdkit_debug ("%s: unit attention (0x%04x), retrying", what,
                  t->sense.ascq);
    scsi_free_scsi_task (t);
    return 1;
  }
  nbdkit_error ("%s: SCSI status %d, sense key 0x%x, asc/ascq 0x%04x",
                what, t->status, (unsigned) t->sense.key, t->sense.ascq);
  nbdkit_set_error (t->sense.key == SCSI_SENSE_DATA_PROTECTION ? EPERM
                    : t->sense.key == SCSI_SENSE_ILLEGAL_REQUEST ? EINVAL
                    : EIO);
  scsi_free_scsi_task (t);
  return -1;
}

/* Run CALL into TASK until it is not a unit attention; TASK is NULL on
 * failure. */
#define RUN(h, task, what, call)                                \
  do {                                                          \
    for (int attempt_ = 0;; attempt_++) {                       \
      (task) = (call);                                          \
      if (check ((h), &(task), (what), attempt_) != 1)          \
        break;                                                  \
    }                                                           \
  } while (0)

static void
bridge_close (void *hv)
{
  struct handle *h = hv;

  if (h->iscsi) {
    if (iscsi_is_logged_in (h->iscsi))
      iscsi_logout_sync (h->iscsi);
    iscsi_destroy_context (h->iscsi);
  }
  free (h);
}

static void *
bridge_open (int readonly)
{
  struct handle *h;
  struct scsi_task *task;
  struct scsi_readcapacity16 *rc;
  int lbpme;

  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->iscsi = iscsi_create_context (initiator);
  if (h->iscsi == NULL) {
    nbdkit_error ("iscsi_create_context failed");
    goto fail;
  }
  if (user != NULL &&
      iscsi_set_initiator_username_pwd (h->iscsi, user, password) != 0) {
    nbdkit_error ("CHAP: %s", iscsi_get_error (h->iscsi));
    goto fail;
  }
  if (iscsi_set_targetname (h->iscsi, target) != 0 ||
      iscsi_set_session_type (h->iscsi, ISCSI_SESSION_NORMAL) != 0 ||
      iscsi_set_header_digest (h->iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C) != 0 ||
      iscsi_set_timeout (h->iscsi, timeout) != 0) {
    nbdkit_error ("session setup: %s", iscsi_get_error (h->iscsi));
    goto fail;
  }
  if (iscsi_full_connect_sync (h->iscsi, portal, lun) != 0) {
    nbdkit_error ("login to %s at %s, LUN %d: %s", target, portal, lun,
                  iscsi_get_error (h->iscsi));
    goto fail;
  }

  RUN (h, task, "READ CAPACITY(16)", iscsi_readcapacity16_sync (h->iscsi, lun));
  if (task == NULL)
    goto fail;
  rc = scsi_datain_unmarshall (task);
  if (rc == NULL || rc->block_length == 0 || rc->block_length > MAX_CHUNK) {
    nbdkit_error ("READ CAPACITY(16): cannot parse the answer");
    scsi_free_scsi_task (task);
    goto fail;
  }
  h->block_size = rc->block_length;
  h->blocks = rc->returned_lba + 1;
  lbpme = rc->lbpme;
  scsi_free_scsi_task (task);
  h->max_xfer = MAX_CHUNK / h->block_size;

  /* The Block Limits VPD page is optional: without it, no UNMAP. */
  task = iscsi_inquiry_sync (h->iscsi, lun, 1,
                             SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS, 255);
  if (task != NULL && task->status == SCSI_STATUS_GOOD) {
    struct scsi_inquiry_block_limits *bl = scsi_datain_unmarshall (task);
    if (bl != NULL) {
      if (bl->max_xfer_len > 0 && bl->max_xfer_len < h->max_xfer)
        h->max_xfer = bl->max_xfer_len;
      if (lbpme)
        h->max_unmap = bl->max_unmap;
    }
  }
  if (task != NULL)
    scsi_free_scsi_task (task);

  nbdkit_debug ("%s LUN %d: %" PRIu64 " blocks of %" PRIu32 " bytes, "
                "%" PRIu32 " blocks per I/O, %" PRIu32 " per UNMAP",
                target, lun, h->blocks, h->block_size, h->max_xfer,
                h->max_unmap);
  return h;

 fail:
  bridge_close (h);
  return NULL;
}

static int64_t
bridge_get_size (void *hv)
{
  struct handle *h = hv;
  return (int64_t) (h->blocks * h->block_size);
}

static int
bridge_block_size (void *hv, uint32_t *minimum, uint32_t *preferred,
                   uint32_t *maximum)
{
  struct handle *h = hv;
  /* Any alignment works (read-modify-write), whole blocks work best. */
  *minimum = 1;
  *preferred = h->block_size > 4096 ? h->block_size : 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int bridge_can_write (void *hv) { return 1; }
static int bridge_can_flush (void *hv) { return 1; }
static int bridge_can_fua (void *hv) { return NBDKIT_FUA_NATIVE; }
static int bridge_is_rotational (void *hv) { return 0; }

static int
bridge_can_trim (void *hv)
{
  struct handle *h = hv;
  return h->max_unmap > 0;
}

/* Read NBLOCKS whole blocks at LBA into BUF. */
static int
read_blocks (struct handle *h, uint64_t lba, uint32_t nblocks, void *buf)
{
  struct scsi_task *task;
  uint32_t len = nblocks * h->block_size;

  RUN (h, task, "READ(16)",
       iscsi_read16_sync (h->iscsi, lun, lba, len, h->block_size,
                          0, 0, 0, 0, 0));
  if (task == NULL)
    return -1;
  if (task->datain.size < 0 || (uint32_t) task->datain.size < len) {
    nbdkit_error ("READ(16) at LBA %" PRIu64 ": %d bytes of %" PRIu32,
                  lba, task->datain.size, len);
    nbdkit_set_error (EIO);
    scsi_free_scsi_task (task);
    return -1;
  }
  memcpy (buf, task->datain.data, len);
  scsi_free_scsi_task (task);
  return 0;
}

static int
write_blocks (struct handle *h, uint64_t lba, uint32_t nblocks,
              const void *buf, int fua)
{
  struct scsi_task *task;

  RUN (h, task, "WRITE(16)",
       iscsi_write16_sync (h->iscsi, lun, lba, (unsigned char *) buf,
                           nblocks * h->block_size, h->block_size,
                           0, 0, fua, 0, 0));
  if (task == NULL)
    return -1;
  scsi_free_scsi_task (task);
  return 0;
}

/* The whole blocks covering up to the next MAX_XFER blocks of a request
 * of COUNT bytes at OFFSET: first LBA, block count, offset into the first
 * block, and how many of the request's bytes they hold. */
static void
span (struct handle *h, uint32_t count, uint64_t offset, uint64_t *lba,
      uint32_t *nblocks, uint32_t *skip, uint32_t *n)
{
  uint64_t bs = h->block_size;
  uint64_t blocks;

  *lba = offset / bs;
  *skip = offset % bs;
  blocks = (*skip + (uint64_t) count + bs - 1) / bs;
  if (blocks > h->max_xfer)
    blocks = h->max_xfer;
  *nblocks = blocks;
  *n = blocks * bs - *skip < count ? blocks * bs - *skip : count;
}

static int
bridge_pread (void *hv, void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  struct handle *h = hv;
  char *out = buf;

  while (count > 0) {
    uint64_t lba;
    uint32_t nblocks, skip, n;

    span (h, count, offset, &lba, &nblocks, &skip, &n);
    if (skip == 0 && n == nblocks * h->block_size) {
      if (read_blocks (h, lba, nblocks, out) == -1)
        return -1;
    }
    else {
      char *bounce = malloc ((size_t) nblocks * h->block_size);
      if (bounce == NULL) {
        nbdkit_error ("malloc: %m");
        return -1;
      }
      if (read_blocks (h, lba, nblocks, bounce) == -1) {
        free (bounce);
        return -1;
      }
      memcpy (out, bounce + skip, n);
      free (bounce);
    }
    out += n;
    offset += n;
    count -= n;
  }
  return 0;
}

static int
bridge_pwrite (void *hv, const void *buf, uint32_t count, uint64_t offset,
               uint32_t flags)
{
  struct handle *h = hv;
  const char *in = buf;
  int fua = (flags & NBDKIT_FLAG_FUA) != 0;

  while (count > 0) {
    uint64_t lba;
    uint32_t nblocks, skip, n;

    span (h, count, offset, &lba, &nblocks, &skip, &n);
    if (skip == 0 && n == nblocks * h->block_size) {
      if (write_blocks (h, lba, nblocks, in, fua) == -1)
        return -1;
    }
    else {
      /* Read-modify-write the partly covered blocks. */
      char *bounce = malloc ((size_t) nblocks * h->block_size);
      if (bounce == NULL) {
        nbdkit_error ("malloc: %m");
        return -1;
      }
      if (read_blocks (h, lba, nblocks, bounce) == -1) {
        free (bounce);
        return -1;
      }
      memcpy (bounce + skip, in, n);
      if (write_blocks (h, lba, nblocks, bounce, fua) == -1) {
        free (bounce);
        return -1;
      }
      free (bounce);
    }
    in += n;
    offset += n;
    count -= n;
  }
  return 0;
}

static int
bridge_flush (void *hv, uint32_t flags)
{
  struct handle *h = hv;
  struct scsi_task *task;

  RUN (h, task, "SYNCHRONIZE CACHE(10)",
       iscsi_synchronizecache10_sync (h->iscsi, lun, 0, 0, 0, 0));
  if (task == NULL)
    return -1;
  scsi_free_scsi_task (task);
  return 0;
}

/* UNMAP the whole blocks inside the range (a trim is only a hint). */
static int
bridge_trim (void *hv, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = hv;
  uint64_t bs = h->block_size;
  uint64_t first = (offset + bs - 1) / bs;
  uint64_t end = (offset + count) / bs;

  while (first < end) {
    struct scsi_task *task;
    struct unmap_list range;
    uint64_t num = end - first;

    if (num > h->max_unmap)
      num = h->max_unmap;
    range.lba = first;
    range.num = num;
    RUN (h, task, "UNMAP",
         iscsi_unmap_sync (h->iscsi, lun, 0, 0, &range, 1));
    if (task == NULL)
      return -1;
    scsi_free_scsi_task (task);
    first += num;
  }
  if (flags & NBDKIT_FLAG_FUA)
    return bridge_flush (hv, 0);
  return 0;
}

static void
bridge_dump_plugin (void)
{
  printf ("iscsi_plugin_source=corral\n");
}

static struct nbdkit_plugin plugin = {
  .name              = "iscsi",
  .longname          = "nbdkit iSCSI plugin (corral's libiscsi bridge)",
  .version           = "1",
  .description       = "Serve an iSCSI LUN over NBD through libiscsi",
  .unload            = bridge_unload,
  .config            = bridge_config,
  .config_complete   = bridge_config_complete,
  .config_help       =
    "target=<IQN>      (required) The iSCSI target name.\n"
    "portal=<HOST:PORT> The target portal (default 127.0.0.1:3260).\n"
    "lun=<N>           The LUN (default 0).\n"
    "initiator=<IQN>   The initiator name.\n"
    "user=<NAME>       CHAP user name.\n"
    "password=<SECRET> CHAP secret (see nbdkit_read_password).\n"
    "timeout=<SECS>    Per-command timeout (default 60).",
  .dump_plugin       = bridge_dump_plugin,
  .open              = bridge_open,
  .close             = bridge_close,
  .get_size          = bridge_get_size,
  .block_size        = bridge_block_size,
  .can_write         = bridge_can_write,
  .can_flush         = bridge_can_flush,
  .can_fua           = bridge_can_fua,
  .can_trim          = bridge_can_trim,
  .is_rotational     = bridge_is_rotational,
  .pread             = bridge_pread,
  .pwrite            = bridge_pwrite,
  .flush             = bridge_flush,
  .trim              = bridge_trim,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
