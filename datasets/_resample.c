/* Resampling of 8-bit grey images that gives the same bytes as Pillow's Image.resize
 * (BICUBIC and BILINEAR, no reducing_gap), computed faster.
 *
 * The arithmetic is Pillow's: filter weights in double precision, normalised per output
 * pixel, rounded to 22-bit fixed point; a horizontal pass over the rows the vertical pass
 * needs, its result rounded to 8 bits, then the vertical pass. Only the loop order differs:
 * every pass here runs along contiguous rows (the horizontal one on a transposed copy), so
 * the compiler vectorises the integer multiply-adds. datasets/resample.py checks the result
 * against Pillow itself before it is used.
 *
 * Build: cc -O3 -shared -fPIC -ffp-contract=off _resample.c -o _resample.so -lm
 * (-ffp-contract=off: the weights must not use fused multiply-adds, as Pillow's do not).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FIXED_BITS 22 /* 32 bits - 8 bits of pixel - 2 bits of head room */

enum { FILTER_BILINEAR = 2, FILTER_BICUBIC = 3 }; /* Pillow's Resampling enum values */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static double bicubic_weight(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

static double bilinear_weight(double x) {
    if (x < 0.0) {
        x = -x;
    }
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Taps of one pass: for output i, `count[i]` weights from input index `first[i]`, stored
 * at weights[i * width]. Returns width (the most taps of any output), 0 on failure. */
static int pass_weights(int in_size, int out_size, int filter, int **first_out, int **count_out,
                        int32_t **weights_out) {
    double (*weight)(double) = filter == FILTER_BICUBIC ? bicubic_weight : bilinear_weight;
    double support = filter == FILTER_BICUBIC ? 2.0 : 1.0;
    /* Pillow takes the box edges as float and subtracts them in float: exact for image sizes. */
    double scale = (double)((float)in_size - 0.0f) / out_size;
    double filter_scale = scale < 1.0 ? 1.0 : scale;
    support *= filter_scale;
    int width = (int)ceil(support) * 2 + 1;
    int *first = malloc(sizeof(int) * out_size);
    int *count = malloc(sizeof(int) * out_size);
    double *taps = malloc(sizeof(double) * width);
    int32_t *weights = calloc((size_t)out_size * width, sizeof(int32_t));
    if (!first || !count || !taps || !weights) {
        free(first), free(count), free(taps), free(weights);
        return 0;
    }
    for (int i = 0; i < out_size; i++) {
        double center = 0.0 + (i + 0.5) * scale;
        double total = 0.0;
        double inv = 1.0 / filter_scale;
        int lo = (int)(center - support + 0.5);
        int hi = (int)(center + support + 0.5);
        if (lo < 0) {
            lo = 0;
        }
        if (hi > in_size) {
            hi = in_size;
        }
        int n = hi - lo;
        for (int t = 0; t < n; t++) {
            taps[t] = weight((t + lo - center + 0.5) * inv);
            total += taps[t];
        }
        for (int t = 0; t < n; t++) {
            double w = total != 0.0 ? taps[t] / total : taps[t];
            weights[(size_t)i * width + t] =
                w < 0 ? (int32_t)(-0.5 + w * (1 << FIXED_BITS)) : (int32_t)(0.5 + w * (1 << FIXED_BITS));
        }
        first[i] = lo;
        count[i] = n;
    }
    free(taps);
    *first_out = first;
    *count_out = count;
    *weights_out = weights;
    return width;
}

/* out row i = round(sum over taps t of in row (first[i] + t) * weight[i][t]), every row
 * `len` pixels long: the multiply-adds run along contiguous memory. */
VECTOR_CLONES
static void rows_pass(const uint8_t *restrict in, size_t in_stride, uint8_t *restrict out,
                      size_t out_stride, int out_rows, int len, const int *first, const int *count,
                      const int32_t *weights, int width, int32_t *restrict acc) {
    for (int i = 0; i < out_rows; i++) {
        const int32_t *w = weights + (size_t)i * width;
        for (int x = 0; x < len; x++) {
            acc[x] = 1 << (FIXED_BITS - 1);
        }
        for (int t = 0; t < count[i]; t++) {
            const uint8_t *src = in + (size_t)(first[i] + t) * in_stride;
            const int32_t c = w[t];
            for (int x = 0; x < len; x++) {
                acc[x] += (int32_t)src[x] * c;
            }
        }
        uint8_t *dst = out + (size_t)i * out_stride;
        for (int x = 0; x < len; x++) {
            int32_t v = acc[x] >> FIXED_BITS;
            dst[x] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

#if defined(__SSE2__)
#include <emmintrin.h>

/* A 16 x 16 block of bytes transposed with SSE2 unpacks (4 rounds of interleaving). */
static void transpose16(const uint8_t *src, size_t src_stride, uint8_t *dst, size_t dst_stride) {
    /* After the rounds, register i holds source column bit-reverse(i). */
    static const int column_of[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    __m128i a[16], b[16];
    for (int i = 0; i < 16; i++) {
        a[i] = _mm_loadu_si128((const __m128i *)(src + i * src_stride));
    }
    for (int i = 0; i < 8; i++) {
        b[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 2; j++) {
            a[4 * i + j] = _mm_unpacklo_epi16(b[4 * i + j], b[4 * i + j + 2]);
            a[4 * i + j + 2] = _mm_unpackhi_epi16(b[4 * i + j], b[4 * i + j + 2]);
        }
    }
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 4; j++) {
            b[8 * i + j] = _mm_unpacklo_epi32(a[8 * i + j], a[8 * i + j + 4]);
            b[8 * i + j + 4] = _mm_unpackhi_epi32(a[8 * i + j], a[8 * i + j + 4]);
        }
    }
    for (int j = 0; j < 8; j++) {
        a[j] = _mm_unpacklo_epi64(b[j], b[j + 8]);
        a[j + 8] = _mm_unpackhi_epi64(b[j], b[j + 8]);
    }
    for (int i = 0; i < 16; i++) {
        _mm_storeu_si128((__m128i *)(dst + column_of[i] * dst_stride), a[i]);
    }
}
#endif

/* dst (cols x rows) = transpose of src (rows x cols, row stride `stride`). */
static void transpose(const uint8_t *restrict src, size_t stride, int rows, int cols,
                      uint8_t *restrict dst) {
    int r0 = 0, c0 = 0;
#if defined(__SSE2__)
    for (r0 = 0; r0 + 16 <= rows; r0 += 16) {
        for (c0 = 0; c0 + 16 <= cols; c0 += 16) {
            transpose16(src + (size_t)r0 * stride + c0, stride, dst + (size_t)c0 * rows + r0,
                        (size_t)rows);
        }
    }
    /* The edges the 16 x 16 blocks leave: the last columns of the block rows, then the last rows. */
    for (int c = c0; c < cols; c++) {
        for (int r = 0; r < r0; r++) {
            dst[(size_t)c * rows + r] = src[(size_t)r * stride + c];
        }
    }
#endif
    const int tile = 32;
    for (int t0 = r0; t0 < rows; t0 += tile) {
        int t1 = t0 + tile < rows ? t0 + tile : rows;
        for (int u0 = 0; u0 < cols; u0 += tile) {
            int u1 = u0 + tile < cols ? u0 + tile : cols;
            for (int c = u0; c < u1; c++) {
                for (int r = t0; r < t1; r++) {
                    dst[(size_t)c * rows + r] = src[(size_t)r * stride + c];
                }
            }
        }
    }
}

/* Resize src (in_h x in_w, row stride `stride`) to dst (out_h x out_w, contiguous) as
 * Pillow's Image.resize((out_w, out_h), filter) does. Returns 0, or -1 (bad arguments or
 * no memory). */
int resample_u8(const uint8_t *src, int in_h, int in_w, size_t stride, uint8_t *dst, int out_h,
                int out_w, int filter) {
    if (in_h < 1 || in_w < 1 || out_h < 1 || out_w < 1 ||
        (filter != FILTER_BICUBIC && filter != FILTER_BILINEAR)) {
        return -1;
    }
    int need_h = out_w != in_w, need_v = out_h != in_h;
    int *vfirst = NULL, *vcount = NULL, *hfirst = NULL, *hcount = NULL;
    int32_t *vweights = NULL, *hweights = NULL, *acc = NULL;
    uint8_t *src_t = NULL, *mid_t = NULL, *mid = NULL;
    int status = -1;
    int vwidth = pass_weights(in_h, out_h, filter, &vfirst, &vcount, &vweights);
    if (!vwidth) {
        goto done;
    }
    /* The rows of the source the vertical pass reads. */
    int row0 = vfirst[0];
    int row1 = vfirst[out_h - 1] + vcount[out_h - 1];
    int rows = row1 - row0;
    int longest = in_w > rows ? in_w : rows;
    longest = longest > out_w ? longest : out_w;
    acc = malloc(sizeof(int32_t) * (size_t)longest);
    if (!acc) {
        goto done;
    }
    const uint8_t *vsrc = src + (size_t)row0 * stride;
    size_t vstride = stride;
    int vcols = in_w;
    if (need_h) {
        int hwidth = pass_weights(in_w, out_w, filter, &hfirst, &hcount, &hweights);
        src_t = malloc((size_t)in_w * rows);
        mid_t = malloc((size_t)out_w * rows);
        mid = malloc((size_t)rows * out_w);
        if (!hwidth || !src_t || !mid_t || !mid) {
            goto done;
        }
        /* Horizontal pass = a pass over the rows of the transposed image. */
        transpose(vsrc, stride, rows, in_w, src_t);
        rows_pass(src_t, (size_t)rows, mid_t, (size_t)rows, out_w, rows, hfirst, hcount, hweights,
                  hwidth, acc);
        transpose(mid_t, (size_t)rows, out_w, rows, mid);
        vsrc = mid;
        vstride = (size_t)out_w;
        vcols = out_w;
    }
    if (need_v) {
        for (int i = 0; i < out_h; i++) {
            vfirst[i] -= row0;
        }
        rows_pass(vsrc, vstride, dst, (size_t)out_w, out_h, vcols, vfirst, vcount, vweights, vwidth,
                  acc);
    } else {
        for (int i = 0; i < out_h; i++) {
            memcpy(dst + (size_t)i * out_w, vsrc + (size_t)i * vstride, (size_t)out_w);
        }
    }
    status = 0;
done:
    free(vfirst), free(vcount), free(vweights), free(hfirst), free(hcount), free(hweights);
    free(acc), free(src_t), free(mid_t), free(mid);
    return status;
}
