# Shared helpers for the benchmark scripts (sourced).

# median "N N N ...": the median of whitespace-separated integers.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }

# ratio A B: A/B with two or three decimals.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {printf "%.*f", d, a/b}'; }

# c_program PATH: compiles the C source on stdin (gcc -O2) into PATH.
c_program() { gcc -O2 -x c -o "$1" -; }

# wait_attached PID ERRFILE: waits until hakctl (PID, its stderr in ERRFILE)
# says it attached; if it exits first, prints what it said and fails.
wait_attached() {
    until grep -q attached "$2"; do
        kill -0 "$1" 2>/dev/null || { cat "$2" >&2; exit 1; }
        sleep 0.05
    done
}
