/* The update codec's arithmetic (device_runtime.codec): each tensor's payload, encoded or
 * decoded, in a pass or two over its elements, and on encoding the container around them (the
 * record heads, the payloads and the CRC's slot). The layouts are the ones in the codec's
 * docstring; the Python side checks the arguments, reads the framing on decoding, and turns the
 * status codes below into CodecErrors that name the tensor.
 *
 * Why C: numpy needs five to eight passes over an update for one stochastically rounded
 * encoding (scale, multiply, dither, round, cast, pack), each through memory, and a dozen
 * calls per tensor; here it is two passes, one call per update, the GIL released meanwhile.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the update format is little-endian, and these kernels write it in the host's order"
#endif

/* On x86-64 the loops are also compiled for AVX2, picked at load time when the CPU has it
 * (SSE2, the baseline, lacks 32-bit multiplies and min/max); elsewhere the baseline is enough. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
#define DISPATCH __attribute__((target_clones("avx2", "default")))
#else
#define DISPATCH
#endif

/* Encodings, in the order of codec.ENCODINGS; status codes, codec._OK and the rest. */
enum { FP32, FP16, INT8, INT4, SIGN1, TOPK };
enum { OK, NON_FINITE, OUT_OF_RANGE, BAD_INDICES };

#define INF_BITS 0x7F800000u
#define MIN_SCALE 0x1p-100f       /* int8/int4: 1/s stays finite */
#define FP16_LIMIT (65504.0f * 0x1p14f) /* the largest |x| scaled fp16 holds */
#define CHUNK 4096                /* elements per step of the two-stage loops: their buffers fit in L1 */
#define TOPK_STRIDE 67            /* the sample: every 67th |x|, a prime, so it does not alias rows */

static inline uint32_t bits_of(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline float float_of(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }
/* Payload fields sit at any byte offset of the container: read and write them unaligned. */
static inline uint16_t load16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t load32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void store16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void store32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* A scale as stored: the high half of its float32 bits, rounded up (so |x| / s never passes
 * qmax). s >= 0 here, so adding 0xFFFF cannot wrap. */
static inline uint16_t bf16_up(float s) { return (uint16_t)((bits_of(s) + 0xFFFFu) >> 16); }
static inline float bf16_value(uint16_t stored) { return float_of((uint32_t)stored << 16); }

/* Bits of max |x| over x[0..n): for floats >= 0 the order of the bits is the order of the
 * values, and NaN and Inf sort above every finite one (so >= INF_BITS means non-finite). */
DISPATCH static uint32_t abs_max_bits(const float *x, size_t n)
{
    uint32_t top = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = bits_of(x[i]) & 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    return top;
}

/* murmur3's finaliser: a well-mixed 32-bit hash of the element index, the dither's source. */
static inline uint32_t fmix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

/* float32 to float16 bits, rounded to nearest even, subnormal halves included (F. Giesen's
 * float_to_half_fast3_rtne). y is finite and |y| <= 65504: the fp16 scale sees to it. */
static inline uint16_t half_of(float y)
{
    uint32_t f = bits_of(y);
    uint32_t sign = (f >> 16) & 0x8000u;
    f &= 0x7FFFFFFFu;
    /* a normal half: exponent rebiased by 15 - 127, the 13 dropped bits rounded to even */
    uint32_t normal = (f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13;
    /* a subnormal half or 0: adding 0.5 puts its 10 bits at the bottom, rounded by the FPU */
    uint32_t small = bits_of(float_of(f) + 0.5f) - 0x3F000000u;
    return (uint16_t)(sign | (f < 0x38800000u ? small : normal));
}

/* float16 bits (not Inf or NaN) times factor / 2**112: a half's magnitude bits shifted left
 * by 13 are a float32 2**112 times smaller, exactly, subnormals too. */
static inline float from_half(uint16_t h, float factor)
{
    uint32_t b = ((uint32_t)(h & 0x8000u) << 16) | ((uint32_t)(h & 0x7FFFu) << 13);
    return float_of(b) * factor;
}

/* The fp16/topk scale: the power of two 2**e putting max |x| / s in (2**14, 2**15], e in
 * [-126, 14], as its bfloat16 bits. */
static uint16_t half_scale(float amax)
{
    int e;
    frexpf(amax, &e);
    e -= 15;
    e = e < -126 ? -126 : e > 14 ? 14 : e;
    return (uint16_t)((e + 127) << 7);
}

static int valid_half_scale(uint16_t stored)
{
    int exponent = stored >> 7;
    return (stored & 0x807Fu) == 0 && exponent >= 1 && exponent <= 127 + 14;
}

/* One channel's n elements, stochastically rounded: q = floor(x * inv + u), u uniform on [0, 1)
 * on a grid of 2**-16, an unbiased estimate of x / s to within 2**-16 of a step (u's grid and
 * the float rounding of the sum), clamped to [-qmax, qmax] against the last ulp of x * inv.
 * Written as q + bias: int8 bytes (bias 0) or int4 nibbles (bias 8).
 *
 * The random bits: 32 per hash of (seed, word index), two elements' worth; hashing into a buffer
 * first, then rounding, is twice as fast as a hash per element (32-bit multiplies are slow).
 * qmax + 1 + u is built as a float directly: its exponent says qmax + 1 (128 or 8, powers of
 * two), the 16 bits fill the top of its mantissa, below the units; adding it to x * inv makes
 * the sum positive, so the conversion's truncation is floor. */
#define GOLDEN 0x9E3779B9u
DISPATCH static void quantize(const float *x, size_t n, float inv, int qmax, uint32_t seed, uint8_t *q)
{
    /* t = q + qmax + 1, in [1, 2 qmax + 1]: an int8 byte is t - 128, an int4 nibble t itself */
    const int e = qmax == 127 ? 7 : 3, low = 1, high = 2 * qmax + 1, to_byte = qmax == 127 ? 128 : 0;
    const uint32_t exponent = (uint32_t)(127 + e) << 23, shift = (uint32_t)(7 - e);
    union {
        uint32_t words[CHUNK / 2];
        uint16_t bits[CHUNK];
    } random;
    for (size_t from = 0; from < n; from += CHUNK) {
        const uint32_t len = (uint32_t)(n - from < CHUNK ? n - from : CHUNK);
        const uint32_t first = seed + (uint32_t)(from / 2) * GOLDEN;
        for (uint32_t w = 0; w < (len + 1) / 2; w++) /* 32-bit counters: whole vectors of them */
            random.words[w] = fmix32(first + w * GOLDEN);
        const float *xs = x + from;
        uint8_t *qs = q + from;
        for (uint32_t i = 0; i < len; i++) {
            int32_t t = (int32_t)(xs[i] * inv + float_of(exponent | (uint32_t)random.bits[i] << shift));
            t = t > high ? high : t;
            t = t < low ? low : t;
            qs[i] = (uint8_t)(t - to_byte);
        }
    }
}

/* out[i] = q[i] * s over [from, to) of a tensor whose channels hold m elements each; q holds
 * the range's q values from q[0]. */
DISPATCH static void scale_range(const int8_t *q, size_t from, size_t to, size_t m, const float *scale, float *out)
{
    for (size_t i = from; i < to;) {
        size_t c = i / m, end = (c + 1) * m < to ? (c + 1) * m : to;
        const float s = scale[c];
        const int8_t *qs = q + (i - from);
        float *os = out + i;
        const uint32_t len = (uint32_t)(end - i);
        for (uint32_t j = 0; j < len; j++)
            os[j] = (float)qs[j] * s;
        i = end;
    }
}

/* Eight 0/1 bytes (the first in the lowest) to one byte, the first in the most significant bit. */
static inline uint8_t pack8(const uint8_t *bits)
{
    uint64_t v;
    memcpy(&v, bits, 8);
    return (uint8_t)((v * 0x8040201008040201ull) >> 56);
}

/* Nibbles (one per byte, < 16) two to a byte, element 2i in the low half: read as 16-bit
 * words w = hi << 8 | lo, w | w >> 4 has lo | hi << 4 in its low byte. nibbles has n + 1 bytes. */
DISPATCH static void pack_nibbles(uint8_t *nibbles, size_t n, uint8_t *body)
{
    nibbles[n] = 0; /* an odd tail's high nibble */
    for (size_t j = 0; j < (n + 1) / 2; j++) {
        uint16_t w = load16(nibbles + 2 * j);
        body[j] = (uint8_t)(w | w >> 4);
    }
}

/* SIGNS[b]: the eight q (+1 or -1, as int8 bytes) that the sign1 byte b stands for. */
static uint64_t SIGNS[256];

static void fill_signs(void)
{
    for (int b = 0; b < 256; b++) {
        int8_t q[8];
        for (int j = 0; j < 8; j++)
            q[j] = (b >> (7 - j)) & 1 ? 1 : -1;
        memcpy(&SIGNS[b], q, 8);
    }
}

/* --- encoders: x (n float32, `channels` channels) to the payload in out ---------------- */

static int check_finite(const float *x, size_t n)
{
    return abs_max_bits(x, n) >= INF_BITS ? NON_FINITE : OK;
}

DISPATCH static int encode_fp16(const float *x, size_t n, uint8_t *out)
{
    uint32_t top = abs_max_bits(x, n);
    if (top >= INF_BITS)
        return NON_FINITE;
    if (!(float_of(top) <= FP16_LIMIT))
        return OUT_OF_RANGE;
    uint16_t stored = half_scale(float_of(top));
    store16(out, stored);
    const float inv = 1.0f / bf16_value(stored); /* a power of two: exact */
    for (size_t i = 0; i < n; i++)
        store16(out + 2 + 2 * i, half_of(x[i] * inv));
    return OK;
}

/* int8 and int4: per channel s = max |x| / qmax (at least MIN_SCALE), rounded up to bfloat16.
 * Channel by channel, so the rounding pass finds the channel still in cache. */
static int encode_int(const float *x, size_t n, size_t channels, int qmax, uint32_t key, uint8_t *out)
{
    const size_t m = channels ? n / channels : 0;
    const float limit = FLT_MAX / (float)(qmax + 1); /* a decoder meets q down to -qmax - 1 */
    uint8_t *body = out + 2 * channels;
    uint8_t *q = qmax == 127 ? body : malloc(n + 1); /* int4: every nibble, then packed */
    if (!q)
        return -1;
    int status = OK;
    for (size_t c = 0; c < channels; c++) {
        uint32_t top = abs_max_bits(x + c * m, m);
        if (top >= INF_BITS) {
            status = NON_FINITE;
            break;
        }
        float s = float_of(top) / (float)qmax;
        uint16_t stored = bf16_up(s > MIN_SCALE ? s : MIN_SCALE);
        if (!(bf16_value(stored) <= limit)) {
            status = OUT_OF_RANGE;
            break;
        }
        store16(out + 2 * c, stored);
        quantize(x + c * m, m, 1.0f / bf16_value(stored), qmax, fmix32(key + (uint32_t)c), q + c * m);
    }
    if (qmax == 7) {
        if (status == OK)
            pack_nibbles(q, n, body);
        free(q);
    }
    return status;
}

/* sign1: per channel s = mean |x|; bits 1 for x >= 0, first element in the most significant. */
DISPATCH static int encode_sign1(const float *x, size_t n, size_t channels, uint8_t *out)
{
    const size_t m = channels ? n / channels : 0;
    for (size_t c = 0; c < channels; c++) {
        const float *xc = x + c * m;
        if (abs_max_bits(xc, m) >= INF_BITS)
            return NON_FINITE;
        float lane[16] = {0}; /* sixteen sums: a vectorisable reduction */
        size_t i = 0;
        for (; i + 16 <= m; i += 16)
            for (int j = 0; j < 16; j++)
                lane[j] += fabsf(xc[i + j]);
        for (; i < m; i++)
            lane[i % 16] += fabsf(xc[i]);
        double sum = 0;
        for (int j = 0; j < 16; j++)
            sum += lane[j];
        uint16_t stored = bf16_up((float)(sum / (double)(m ? m : 1)));
        if (!(bf16_value(stored) <= FLT_MAX))
            return OUT_OF_RANGE;
        store16(out + 2 * c, stored);
    }
    uint8_t *body = out + 2 * channels;
    uint8_t positive[CHUNK];
    for (size_t from = 0; from < n; from += CHUNK) { /* CHUNK is a multiple of 8 */
        const uint32_t len = (uint32_t)(from + CHUNK < n ? CHUNK : n - from);
        for (uint32_t j = 0; j < len; j++)
            positive[j] = x[from + j] >= 0.0f;
        for (uint32_t j = len; j % 8; j++)
            positive[j] = 0; /* the last byte's padding bits */
        for (uint32_t j = 0; j < len; j += 8)
            body[(from + j) / 8] = pack8(positive + j);
    }
    return OK;
}

/* a[0..n) reordered so that the values for which `first` holds come first; returns how many. */
#define PARTITION(a, n, first)                                                                     \
    ({                                                                                             \
        size_t count_ = 0;                                                                         \
        for (size_t i_ = 0; i_ < (n); i_++) { /* without a branch: random values mispredict */     \
            float v = (a)[i_];                                                                     \
            (a)[i_] = (a)[count_];                                                                 \
            (a)[count_] = v;                                                                       \
            count_ += (first);                                                                     \
        }                                                                                          \
        count_;                                                                                    \
    })

/* The k-th smallest (from 0) of a[0..n), which holds no NaN; a is reordered. Quickselect with
 * a median-of-three pivot: [< pivot] first, then on into one side; when nothing is below the
 * pivot (the smallest value), [== pivot] splits off instead, so runs of equal values end it. */
static float kth_smallest(float *a, size_t n, size_t k)
{
    while (n > 1) {
        float first = a[0], middle = a[n / 2], last = a[n - 1];
        float pivot = fmaxf(fminf(first, middle), fminf(fmaxf(first, middle), last));
        size_t less = PARTITION(a, n, v < pivot);
        if (k < less) {
            n = less;
            continue;
        }
        if (less == 0) {
            less = PARTITION(a, n, v == pivot);
            if (k < less)
                return pivot;
        }
        a += less, n -= less, k -= less;
    }
    return a[0];
}

/* Bit i of hits (64 per word) = |x[i]| >= threshold, in one pass, as integers: the bits of
 * floats >= 0 order as their values, and NaN and Inf, above every finite value, are hits (for
 * the caller to refuse). Compared into bytes (a vectorised loop), eight bytes packed into a
 * byte by a multiply. hits has ceil(n / 64) words; returns how many bits are set. */
DISPATCH static size_t mark(const float *x, size_t n, float threshold, uint64_t *hits)
{
    const uint32_t t = bits_of(threshold);
    uint8_t hit[CHUNK];
    size_t count = 0;
    for (size_t from = 0; from < n; from += CHUNK) { /* CHUNK is a multiple of 64 */
        const uint32_t len = (uint32_t)(n - from < CHUNK ? n - from : CHUNK);
        for (uint32_t i = 0; i < len; i++)
            hit[i] = (bits_of(x[from + i]) & 0x7FFFFFFFu) >= t;
        for (uint32_t i = len; i % 64; i++)
            hit[i] = 0;
        for (uint32_t w = 0; w < (len + 63) / 64; w++) {
            uint64_t word = 0;
            for (int byte = 0; byte < 8; byte++) { /* the first of eight 0/1 bytes to the lowest bit */
                uint64_t eight;
                memcpy(&eight, hit + 64 * w + 8 * byte, 8);
                word |= ((eight * 0x0102040810204080ull) >> 56) << (8 * byte);
            }
            hits[from / 64 + w] = word;
            count += (size_t)__builtin_popcountll(word);
        }
    }
    return count;
}

/* The indices of the set bits of hits, in order. */
static void collect(const uint64_t *hits, size_t n, uint32_t *index)
{
    size_t j = 0;
    for (size_t w = 0; w < (n + 63) / 64; w++)
        for (uint64_t v = hits[w]; v; v &= v - 1)
            index[j++] = (uint32_t)(64 * w + (size_t)__builtin_ctzll(v));
}

/* topk: the k largest |x| (ties: the first ones), indices increasing, values in scaled fp16,
 * found among candidates alone: the elements at or above a threshold. A large tensor's is set on
 * every 67th |x| so that about twice k (and at least 4 samples' worth) pass; a small tensor's
 * is the least |x| above 0 (an update's zeros, often most of a tensor, are candidates only if k
 * needs them); if fewer than k pass, every element is a candidate. The largest |x|, which sets
 * the scale, always is one, and so are NaN and Inf, refused. */
DISPATCH static int encode_topk(const float *x, size_t n, size_t k, uint8_t *out)
{
    if (k == 0) { /* n == 0 */
        store16(out, half_scale(0.0f));
        return OK;
    }
    float threshold = 0.0f;
    size_t samples = n / TOPK_STRIDE, above = 2 * ((k + TOPK_STRIDE - 1) / TOPK_STRIDE) + 4;
    if (k < n && above < samples) {
        float *sample = malloc(samples * sizeof(float));
        if (!sample)
            return -1;
        uint32_t top = 0;
        for (size_t s = 0; s < samples; s++) {
            uint32_t b = bits_of(x[s * TOPK_STRIDE]) & 0x7FFFFFFFu;
            top = b > top ? b : top;
            sample[s] = float_of(b);
        }
        if (top < INF_BITS) /* else: NaN has no place in an order, and mark refuses it below */
            threshold = kth_smallest(sample, samples, samples - above);
        free(sample);
    }
    uint64_t *hit = malloc((n + 63) / 64 * sizeof(uint64_t));
    if (!hit)
        return -1;
    size_t count = mark(x, n, threshold > 0.0f ? threshold : FLT_TRUE_MIN, hit);
    if (count < k) /* the sample misled, or k takes zeros */
        count = mark(x, n, threshold = 0.0f, hit);
    uint32_t *candidate = malloc(count * sizeof(uint32_t));
    float *magnitude = malloc(2 * count * sizeof(float)), *order = magnitude + count;
    if (!candidate || !magnitude) {
        free(hit);
        free(candidate);
        free(magnitude);
        return -1;
    }
    collect(hit, n, candidate);
    free(hit);
    uint32_t top = 0; /* max |x| as bits: NaN and Inf, candidates if anywhere, sort above */
    for (size_t j = 0; j < count; j++) {
        uint32_t b = bits_of(x[candidate[j]]) & 0x7FFFFFFFu;
        top = b > top ? b : top;
        magnitude[j] = order[j] = float_of(b);
    }
    const float amax = float_of(top);
    int status = top >= INF_BITS ? NON_FINITE : amax <= FP16_LIMIT ? OK : OUT_OF_RANGE;
    if (status == OK) {
        uint16_t stored = half_scale(amax);
        store16(out, stored);
        float kth = kth_smallest(order, count, count - k); /* reorders its copy */
        size_t ties = k; /* how many equal to kth are kept: what k leaves after every larger one */
        for (size_t j = 0; j < count; j++)
            ties -= magnitude[j] > kth;
        size_t kept = 0; /* the kept candidates to the front, in order, without a branch */
        for (size_t j = 0; j < count; j++) {
            size_t tie = magnitude[j] == kth && ties > 0, keep = (magnitude[j] > kth) | tie;
            ties -= tie;
            candidate[kept] = candidate[j];
            kept += keep;
        }
        const float inv = 1.0f / bf16_value(stored);
        for (size_t j = 0; j < k; j++) {
            store32(out + 2 + 4 * j, candidate[j]);
            store16(out + 2 + 4 * k + 2 * j, half_of(x[candidate[j]] * inv));
        }
    }
    free(candidate);
    free(magnitude);
    return status;
}

/* --- decoders: a payload (already checked to fit the shape) to n float32 in out -------- */

static int decode_fp32(const uint8_t *payload, size_t n, float *out)
{
    memcpy(out, payload, 4 * n);
    return check_finite(out, n);
}

DISPATCH static int decode_fp16(const uint8_t *payload, size_t n, float *out)
{
    uint16_t stored = load16(payload);
    if (!valid_half_scale(stored))
        return OUT_OF_RANGE;
    const float factor = bf16_value(stored) * 0x1p112f; /* 2**(112 + e) <= 2**126 */
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = load16(payload + 2 + 2 * i);
        bad |= (h & 0x7C00u) == 0x7C00u;
        out[i] = from_half(h, factor);
    }
    return bad ? NON_FINITE : OK;
}

/* int8, int4 and sign1: channel scales, then q per element, value = q * s. */
DISPATCH static int decode_scaled(int encoding, const uint8_t *payload, size_t n, size_t channels, float *out)
{
    static const float bound[] = {[INT8] = 128.0f, [INT4] = 8.0f, [SIGN1] = 1.0f}; /* largest |q| */
    const float limit = FLT_MAX / bound[encoding];
    float *scale = malloc((channels ? channels : 1) * sizeof(float));
    if (!scale)
        return -1;
    for (size_t c = 0; c < channels; c++) {
        scale[c] = bf16_value(load16(payload + 2 * c));
        if (!(scale[c] >= 0.0f && scale[c] <= limit)) { /* NaN fails both */
            free(scale);
            return OUT_OF_RANGE;
        }
    }
    const uint8_t *body = payload + 2 * channels;
    const size_t m = channels ? n / channels : 0;
    int8_t q[CHUNK + 8];
    for (size_t from = 0; from < n; from += CHUNK) { /* CHUNK is a multiple of 8: whole bytes */
        const size_t to = from + CHUNK < n ? from + CHUNK : n;
        const uint32_t len = (uint32_t)(to - from);
        if (encoding == INT8) {
            memcpy(q, body + from, len);
        } else if (encoding == INT4) { /* an odd tail writes q[len]: q has room */
            const uint8_t *src = body + from / 2;
            for (uint32_t j = 0; j < (len + 1) / 2; j++) {
                q[2 * j] = (int8_t)((src[j] & 15) - 8);
                q[2 * j + 1] = (int8_t)((src[j] >> 4) - 8);
            }
        } else {
            const uint8_t *src = body + from / 8;
            for (uint32_t j = 0; j < (len + 7) / 8; j++) /* a tail past len: q has room */
                memcpy(q + 8 * j, &SIGNS[src[j]], 8);
        }
        scale_range(q, from, to, m, scale, out);
    }
    free(scale);
    return OK;
}

DISPATCH static int decode_topk(const uint8_t *payload, size_t n, size_t k, float *out)
{
    uint16_t stored = load16(payload);
    if (!valid_half_scale(stored))
        return OUT_OF_RANGE;
    const float factor = bf16_value(stored) * 0x1p112f;
    memset(out, 0, 4 * n);
    for (size_t j = 0; j < k; j++) {
        uint32_t i = load32(payload + 2 + 4 * j);
        uint16_t h = load16(payload + 2 + 4 * k + 2 * j);
        if (i >= n || (j > 0 && i <= load32(payload + 2 + 4 * (j - 1))))
            return BAD_INDICES;
        if ((h & 0x7C00u) == 0x7C00u)
            return NON_FINITE;
        out[i] = from_half(h, factor);
    }
    return OK;
}

/* The payload's length in bytes; `scales` is 1 for fp16 and topk, the channels otherwise. */
static size_t payload_size(int encoding, size_t n, size_t scales, size_t k)
{
    switch (encoding) {
    case FP32: return 4 * n;
    case FP16: return 2 + 2 * n;
    case INT8: return 2 * scales + n;
    case INT4: return 2 * scales + (n + 1) / 2;
    case SIGN1: return 2 * scales + (n + 7) / 8;
    default: return 2 + 6 * k;
    }
}

/* --- Python entry points ------------------------------------------------------------- */

static int encode_payload(int encoding, const float *x, size_t n, size_t scales, uint32_t key, size_t k, uint8_t *out)
{
    switch (encoding) {
    case FP32: memcpy(out, x, 4 * n); return check_finite(x, n);
    case FP16: return encode_fp16(x, n, out);
    case INT8: return encode_int(x, n, scales, 127, key, out);
    case INT4: return encode_int(x, n, scales, 7, key, out);
    case SIGN1: return encode_sign1(x, n, scales, out);
    default: return encode_topk(x, n, k, out);
    }
}

static int decode_payload(int encoding, const uint8_t *payload, size_t size, size_t n, size_t scales, float *out)
{
    switch (encoding) {
    case FP32: return decode_fp32(payload, n, out);
    case FP16: return decode_fp16(payload, n, out);
    case TOPK: return decode_topk(payload, n, (size - 2) / 6, out);
    default: return decode_scaled(encoding, payload, n, scales, out);
    }
}

struct job {
    const char *name;
    size_t name_size, n, scales, k, payload_size;
    int encoding;
    uint32_t key;
};

/* The record head before a payload, as the codec docstring lays it out: name length, name,
 * encoding, number of dimensions, shape, payload length. Returns its size. */
static size_t write_head(const struct job *job, const Py_buffer *x, uint8_t *out)
{
    uint8_t *p = out;
    store16(p, (uint16_t)job->name_size);
    memcpy(p + 2, job->name, job->name_size);
    p += 2 + job->name_size;
    *p++ = (uint8_t)job->encoding;
    *p++ = (uint8_t)x->ndim;
    for (int d = 0; d < x->ndim; d++, p += 4)
        store32(p, (uint32_t)x->shape[d]);
    store32(p, (uint32_t)job->payload_size);
    return (size_t)(p + 4 - out);
}

/* pack(prefix, tensors, topk_fraction, crc32) -> bytes, or (status, index) of the first tensor
 * that cannot be encoded. tensors: a list of (name, encoding, x, key), x a C-contiguous float32
 * array of at most 8 dimensions under 2**32, name UTF-8 bytes (both checked by the caller).
 * The container is the prefix, each tensor's record head and payload, and crc32 of all that
 * (computed by the callable, given a memoryview): one allocation, every byte written in place. */
static PyObject *py_pack(PyObject *self, PyObject *args)
{
    Py_buffer prefix;
    PyObject *tensors, *crc32;
    double fraction;
    if (!PyArg_ParseTuple(args, "y*O!dO", &prefix, &PyList_Type, &tensors, &fraction, &crc32))
        return NULL;
    const Py_ssize_t count = PyList_GET_SIZE(tensors);
    Py_buffer *xs = PyMem_Calloc(count ? count : 1, sizeof(Py_buffer));
    struct job *jobs = PyMem_Calloc(count ? count : 1, sizeof(struct job));
    PyObject *data = NULL, *result = NULL;
    Py_ssize_t acquired = 0, failed = -1;
    int status = OK;
    if (!xs || !jobs) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = (size_t)prefix.len + 4;
    for (; acquired < count; acquired++) {
        PyObject *name, *x;
        struct job *job = &jobs[acquired];
        if (!PyArg_ParseTuple(PyList_GET_ITEM(tensors, acquired), "O!iOI", &PyBytes_Type, &name, &job->encoding, &x, &job->key))
            goto done;
        if (PyObject_GetBuffer(x, &xs[acquired], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            goto done;
        const Py_buffer *b = &xs[acquired];
        if (job->encoding < FP32 || job->encoding > TOPK || b->itemsize != 4 || strcmp(b->format, "f") || b->ndim > 8) {
            PyErr_Format(PyExc_ValueError, "tensor %zd: encoding code %d of a %s buffer of %d dimensions", acquired,
                         job->encoding, b->format, b->ndim);
            acquired++;
            goto done;
        }
        job->name = PyBytes_AS_STRING(name);
        job->name_size = (size_t)PyBytes_GET_SIZE(name);
        job->n = (size_t)b->len / 4;
        int per_channel = job->encoding == INT8 || job->encoding == INT4 || job->encoding == SIGN1;
        job->scales = job->encoding == FP32 ? 0 : per_channel && b->ndim >= 2 ? (size_t)b->shape[0] : 1;
        if (job->encoding == TOPK) { /* as codec._topk_count: min(n, ceil(fraction * n)) */
            double k = ceil(fraction * (double)job->n);
            job->k = k < (double)job->n ? (size_t)k : job->n;
        }
        job->payload_size = payload_size(job->encoding, job->n, job->scales, job->k);
        total += 2 + job->name_size + 2 + 4 * (size_t)b->ndim + 4 + job->payload_size;
    }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!data)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(data);
    Py_BEGIN_ALLOW_THREADS
    memcpy(out, prefix.buf, (size_t)prefix.len);
    out += prefix.len;
    for (Py_ssize_t i = 0; i < count && status == OK; i++) {
        const struct job *job = &jobs[i];
        out += write_head(job, &xs[i], out);
        status = encode_payload(job->encoding, xs[i].buf, job->n, job->scales, job->key, job->k, out);
        out += job->payload_size;
        failed = i;
    }
    Py_END_ALLOW_THREADS
    if (status == -1) {
        PyErr_NoMemory();
    } else if (status != OK) {
        result = Py_BuildValue("(in)", status, failed);
    } else {
        PyObject *view = PyMemoryView_FromMemory(PyBytes_AS_STRING(data), (Py_ssize_t)total - 4, PyBUF_READ);
        PyObject *crc = view ? PyObject_CallOneArg(crc32, view) : NULL;
        Py_XDECREF(view);
        unsigned long value = crc ? PyLong_AsUnsignedLong(crc) : 0;
        Py_XDECREF(crc);
        if (crc && !PyErr_Occurred()) {
            store32((uint8_t *)PyBytes_AS_STRING(data) + total - 4, (uint32_t)value);
            result = data;
            data = NULL;
        }
    }
done:
    for (Py_ssize_t i = 0; i < acquired; i++)
        PyBuffer_Release(&xs[i]);
    PyMem_Free(xs);
    PyMem_Free(jobs);
    PyBuffer_Release(&prefix);
    Py_XDECREF(data);
    return result;
}

/* unpack(data, records, out) -> (status, index): decodes every record's payload, one after the
 * other, into the float32 buffer out; index is the first record that failed, or -1. records: a
 * list of (encoding, offset, size, n, scales), their payloads checked to fit their shapes. */
static PyObject *py_unpack(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    PyObject *records;
    if (!PyArg_ParseTuple(args, "y*O!w*", &data, &PyList_Type, &records, &out))
        return NULL;
    const Py_ssize_t count = PyList_GET_SIZE(records);
    size_t *fields = PyMem_Malloc((count ? count : 1) * 5 * sizeof(size_t)), values = 0;
    PyObject *result = NULL;
    if (!fields) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(records, i);
        size_t *f = fields + 5 * i;
        int encoding;
        if (!PyArg_ParseTuple(r, "innnn", &encoding, &f[1], &f[2], &f[3], &f[4]))
            goto done;
        f[0] = (size_t)encoding;
        if (encoding < FP32 || encoding > TOPK || f[1] + f[2] > (size_t)data.len ||
            f[2] != payload_size(encoding, f[3], f[4], f[2] >= 2 ? (f[2] - 2) / 6 : 0)) {
            PyErr_Format(PyExc_ValueError, "record %zd does not fit the data", i);
            goto done;
        }
        values += f[3];
    }
    if (4 * values != (size_t)out.len) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, the records %zu values", out.len, values);
        goto done;
    }
    int status = OK;
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    float *o = out.buf;
    for (Py_ssize_t i = 0; i < count && status == OK; i++) {
        const size_t *f = fields + 5 * i;
        status = decode_payload((int)f[0], (const uint8_t *)data.buf + f[1], f[2], f[3], f[4], o);
        o += f[3];
        failed = status == OK ? -1 : i;
    }
    Py_END_ALLOW_THREADS
    result = status == -1 ? PyErr_NoMemory() : Py_BuildValue("(in)", status, failed);
done:
    PyMem_Free(fields);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"pack", py_pack, METH_VARARGS, "pack(prefix, [(name, encoding, x, key), ...], topk_fraction, crc32) -> bytes | (status, index)"},
    {"unpack", py_unpack, METH_VARARGS, "unpack(data, [(encoding, offset, size, n, scales), ...], out) -> (status, index)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "device_runtime._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
    fill_signs();
    return PyModule_Create(&module);
}
