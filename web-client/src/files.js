// Switchboard SDK: sending files to one participant or everyone, one channel per file and
// recipient: in a mesh a data channel of the connection between the two browsers, on the SFU a
// channel through the server (relay.js). Nothing flows before the recipient accepts; the file
// arrives whole in memory (never written anywhere by the SDK) and is checked against the
// sender's SHA-256. Either side may cancel.
//
// On the channel (label `switchboard-file`), JSON text messages and binary chunks:
//   sender → {type: 'offer', name, size, mime}
//   recipient → {type: 'accept'} | {type: 'decline'}
//   sender → binary chunks of at most CHUNK_BYTES, then {type: 'done', sha256}
//   either → {type: 'cancel'}

import { SwitchboardError } from './errors.js';

/** The channel label that marks a file transfer. */
export const FILE_CHANNEL = 'switchboard-file';
/** Largest file sent or taken, by default. */
export const MAX_FILE_BYTES = 100 * 1024 * 1024;
/** Bytes per chunk: within every browser's data channel message limit. */
const CHUNK_BYTES = 16 * 1024;
/** The sender waits while this much is queued on the channel (through the server: not yet
 * acknowledged by the recipient, over every transfer). */
const HIGH_WATER_BYTES = 1024 * 1024;
/** Longest a name is shown, in characters. */
const MAX_NAME_CHARS = 255;

/**
 * @typedef {'offered' | 'sending' | 'receiving' | 'done' | 'declined' | 'cancelled' | 'failed'} TransferState
 *
 * @typedef {object} Transfer  One file to or from one participant.
 * @property {string} id
 * @property {string} peerId  the other side
 * @property {'send' | 'receive'} direction
 * @property {string} name  as the sender named it: show it as text
 * @property {number} size  bytes
 * @property {string} mime
 * @property {number} bytes  sent or received so far
 * @property {TransferState} state
 * @property {Blob} [blob]  the file, once received and checked
 * @property {() => void} accept  (received offers) start receiving
 * @property {() => void} decline  (received offers) refuse it
 * @property {() => void} cancel  stop it, either side
 *
 * @typedef {RTCDataChannel | import('./relay.js').RelayedChannel} FileChannel
 *
 * @typedef {object} FilesContext  What file transfers need of the room.
 * @property {(peerId: string, label: string) => FileChannel | null} openChannel  a new channel to a
 *   participant (mesh or through the server), or null when there is no way to reach it
 * @property {() => string[]} peers  everyone else in the room
 * @property {(type: string, arg: any) => void} emit
 */

/** @param {ArrayBuffer} data */
async function sha256(data) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', data));
  return [...digest].map((b) => b.toString(16).padStart(2, '0')).join('');
}

export class FileTransfers {
  /** Transfers by id. @type {Map<string, Transfer>} */
  transfers = new Map();
  /** @type {FilesContext} */ #ctx;
  #next = 0;

  /** @param {FilesContext} ctx */
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /**
   * Offers `file` to `to` (a peerId) or to everyone; one transfer per recipient.
   * @param {Blob & {name?: string}} file
   * @param {string} [to]
   * @returns {Transfer[]}
   */
  send(file, to) {
    if (file.size > MAX_FILE_BYTES) {
      throw new SwitchboardError('too_large', `files are at most ${MAX_FILE_BYTES / 1024 / 1024} MiB`);
    }
    const peers = to ? [to] : this.#ctx.peers();
    if (peers.length === 0) throw new SwitchboardError('unknown_peer', 'nobody to send to');
    const channels = peers.map((peerId) => ({ peerId, channel: this.#ctx.openChannel(peerId, FILE_CHANNEL) }));
    const unreachable = channels.filter((c) => !c.channel);
    if (unreachable.length > 0) {
      for (const { channel } of channels) channel?.close();
      throw new SwitchboardError('not_supported', 'files cannot reach everyone now: the room is changing between peer to peer and the server, try again in a moment');
    }
    return channels.map(({ peerId, channel }) => this.#offer(/** @type {FileChannel} */ (channel), peerId, file));
  }

  /**
   * @param {FileChannel} channel
   * @param {string} peerId
   * @param {Blob & {name?: string}} file
   */
  #offer(channel, peerId, file) {
    channel.binaryType = 'arraybuffer';
    const transfer = this.#track({
      id: `send-${++this.#next}`,
      peerId,
      direction: 'send',
      name: (file.name ?? 'file').slice(0, MAX_NAME_CHARS),
      size: file.size,
      mime: file.type,
      channel,
    });
    channel.onopen = () => channel.send(JSON.stringify({ type: 'offer', name: transfer.name, size: file.size, mime: file.type }));
    channel.onmessage = async (/** @type {{data: any}} */ ev) => {
      const msg = parse(ev.data);
      if (msg?.type === 'accept' && transfer.state === 'offered') {
        transfer.state = 'sending';
        try {
          await this.#stream(channel, transfer, await file.arrayBuffer());
        } catch (err) {
          if (transfer.state === 'sending') this.#fail(transfer, channel, err);
        }
      } else if (msg?.type === 'decline') this.#end(transfer, channel, 'declined');
      else if (msg?.type === 'cancel') this.#end(transfer, channel, 'cancelled');
    };
    channel.onclose = () => this.#closed(transfer, channel);
    return transfer;
  }

  /**
   * Sends the file's bytes, never more than HIGH_WATER_BYTES queued, then its checksum.
   * @param {FileChannel} channel
   * @param {Transfer} transfer
   * @param {ArrayBuffer} data
   */
  async #stream(channel, transfer, data) {
    channel.bufferedAmountLowThreshold = HIGH_WATER_BYTES / 2;
    for (let offset = 0; offset < data.byteLength; offset += CHUNK_BYTES) {
      if (transfer.state !== 'sending') return;
      if (channel.bufferedAmount > HIGH_WATER_BYTES) {
        // A channel that closes meanwhile ends the wait too (and with it this hold on the file).
        await new Promise((resolve) => {
          channel.onbufferedamountlow = () => resolve(undefined);
          channel.addEventListener('close', () => resolve(undefined), { once: true });
        });
        if (transfer.state !== 'sending') return;
      }
      channel.send(data.slice(offset, offset + CHUNK_BYTES));
      transfer.bytes = Math.min(offset + CHUNK_BYTES, data.byteLength);
      this.#ctx.emit('fileProgress', transfer);
    }
    channel.send(JSON.stringify({ type: 'done', sha256: await sha256(data) }));
    transfer.state = 'done';
    this.#ctx.emit('fileSent', transfer);
  }

  /**
   * A channel the peer opened: a file offered, when it is one of ours.
   * @param {string} peerId
   * @param {FileChannel} channel
   */
  incoming(peerId, channel) {
    if (channel.label !== FILE_CHANNEL) return;
    channel.binaryType = 'arraybuffer';
    /** @type {Transfer | null} */
    let transfer = null;
    /** @type {ArrayBuffer[]} */
    const chunks = [];
    channel.onmessage = async (/** @type {{data: any}} */ ev) => {
      if (ev.data instanceof ArrayBuffer) {
        if (!transfer || transfer.state !== 'receiving') return;
        transfer.bytes += ev.data.byteLength;
        if (transfer.bytes > transfer.size) {
          this.#fail(transfer, channel, new SwitchboardError('bad_file', 'more bytes came than were offered'));
          return;
        }
        chunks.push(ev.data);
        this.#ctx.emit('fileProgress', transfer);
        return;
      }
      const msg = parse(ev.data);
      if (msg?.type === 'offer' && !transfer) {
        const size = Number(msg.size);
        const offered = this.#track({
          id: `receive-${++this.#next}`,
          peerId,
          direction: 'receive',
          name: String(msg.name ?? 'file').slice(0, MAX_NAME_CHARS),
          size: Number.isSafeInteger(size) && size >= 0 ? size : -1,
          mime: String(msg.mime ?? ''),
          channel,
        });
        transfer = offered;
        if (offered.size < 0 || offered.size > MAX_FILE_BYTES) {
          channel.send(JSON.stringify({ type: 'decline' }));
          this.#end(offered, channel, 'declined');
          return;
        }
        offered.accept = () => {
          if (offered.state !== 'offered') return;
          offered.state = 'receiving';
          channel.send(JSON.stringify({ type: 'accept' }));
        };
        offered.decline = () => {
          if (offered.state !== 'offered') return;
          channel.send(JSON.stringify({ type: 'decline' }));
          this.#end(offered, channel, 'declined');
        };
        this.#ctx.emit('fileOffered', offered);
      } else if (msg?.type === 'done' && transfer?.state === 'receiving') {
        const whole = new Uint8Array(transfer.bytes);
        let at = 0;
        for (const chunk of chunks) {
          whole.set(new Uint8Array(chunk), at);
          at += chunk.byteLength;
        }
        chunks.length = 0;
        const intact = transfer.bytes === transfer.size && (await sha256(whole.buffer)) === msg.sha256;
        // Cancelled while the checksum was worked out: it stays cancelled.
        if (transfer.state !== 'receiving') return;
        if (!intact) {
          this.#fail(transfer, channel, new SwitchboardError('bad_file', 'the file arrived damaged (its checksum differs)'));
          return;
        }
        // Never the sender's type: a `text/html` blob opened from the app's origin would run
        // as the app.
        transfer.blob = new Blob([whole], { type: 'application/octet-stream' });
        transfer.state = 'done';
        this.#ctx.emit('fileReceived', transfer);
        channel.close();
      } else if (msg?.type === 'cancel' && transfer) {
        chunks.length = 0;
        this.#end(transfer, channel, 'cancelled');
      }
    };
    channel.onclose = () => {
      chunks.length = 0;
      if (transfer) this.#closed(transfer, channel);
    };
  }

  /**
   * Registers a transfer in state `offered`.
   * @param {{id: string, peerId: string, direction: 'send' | 'receive', name: string, size: number, mime: string, channel: FileChannel}} init
   * @returns {Transfer}
   */
  #track({ channel, ...init }) {
    /** @type {Transfer} */
    const transfer = {
      ...init,
      bytes: 0,
      state: 'offered',
      accept: () => {},
      decline: () => {},
      cancel: () => {
        if (transfer.state !== 'offered' && transfer.state !== 'sending' && transfer.state !== 'receiving') return;
        if (channel.readyState === 'open') channel.send(JSON.stringify({ type: 'cancel' }));
        this.#end(transfer, channel, 'cancelled');
      },
    };
    this.transfers.set(transfer.id, transfer);
    return transfer;
  }

  /**
   * @param {Transfer} transfer
   * @param {FileChannel} channel
   * @param {'declined' | 'cancelled'} state
   */
  #end(transfer, channel, state) {
    if (transfer.state === 'done' || transfer.state === 'declined' || transfer.state === 'cancelled' || transfer.state === 'failed') return;
    transfer.state = state;
    this.#ctx.emit(state === 'declined' ? 'fileDeclined' : 'fileCancelled', transfer);
    // Closing at once could drop the message just sent: the other side closes on reading it.
    setTimeout(() => channel.close(), 1000);
  }

  /**
   * @param {Transfer} transfer
   * @param {FileChannel} channel
   * @param {unknown} err
   */
  #fail(transfer, channel, err) {
    transfer.state = 'failed';
    this.#ctx.emit('fileFailed', { transfer, message: err instanceof Error ? err.message : String(err) });
    if (channel.readyState === 'open') channel.send(JSON.stringify({ type: 'cancel' }));
    channel.close();
  }

  /**
   * The channel closed: a transfer still under way was cut off.
   * @param {Transfer} transfer
   * @param {FileChannel} channel
   */
  #closed(transfer, channel) {
    if (transfer.state === 'offered' || transfer.state === 'sending' || transfer.state === 'receiving') {
      transfer.state = 'failed';
      const reason = 'closeReason' in channel && channel.closeReason;
      this.#ctx.emit('fileFailed', { transfer, message: reason || 'the connection closed before the file was through' });
    }
  }
}

/** @param {unknown} data */
function parse(data) {
  if (typeof data !== 'string') return null;
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}
